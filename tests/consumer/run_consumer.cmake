# Builds and runs one consumer project of gqe the way a user would; any failed step fails loudly.
# cmake -DMODE=find_package|add_subdirectory|fetch_content|pkg_config -DGQE_SOURCE_DIR=...
#       -DGQE_BINARY_DIR=... -DWORK_DIR=... -DCXX=... -DBUILD_TYPE=... -DGENERATOR=...
#       [-DMAKE_PROGRAM=...] [-DCXX_FLAGS=...] [-DPKG_CONFIG=...] -DEXPECT_VERSION=x.y.z
#       -DEXPECT_GEMM=eigen|openblas|onednn [-DPROGRAMS=a|b] -P run_consumer.cmake
# find_package: installs GQE_BINARY_DIR into WORK_DIR/prefix, checks the installed package (config,
# arch-independent version file, headers, gqe.pc, the example programs in PROGRAMS), then builds the
# consumer against it, and configures it once more with a nlohmann_json target of its own.
# add_subdirectory: builds the consumer with the gqe source tree inside it. fetch_content: packs the
# source tree into an archive and builds a consumer that fetches it with FetchContent (no network)
# and brings its own nlohmann_json target. pkg_config: installs as find_package does and compiles the
# consumer's main.cpp by hand with what `pkg-config --cflags --libs gqe` says.
cmake_minimum_required(VERSION 3.21)

foreach(var MODE GQE_SOURCE_DIR WORK_DIR CXX GENERATOR EXPECT_VERSION EXPECT_GEMM)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()

# Runs a command; on failure prints the command and everything it said, and stops.
function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    list(JOIN ARGN " " cmd)
    message(FATAL_ERROR "${what} failed (exit ${rc})\n  command: ${cmd}\n${out}")
  endif()
  set(run_output "${out}" PARENT_SCOPE)
endfunction()

function(require_file path)
  if(NOT EXISTS "${path}")
    message(FATAL_ERROR "missing from the install: ${path}")
  endif()
endfunction()


# Evaluates a version file as find_package would for EXPECT_VERSION from a project whose pointer
# size differs from this machine's: it must accept.
function(check_version_file path)
  string(REPLACE "." ";" parts "${EXPECT_VERSION}")
  list(GET parts 0 PACKAGE_FIND_VERSION_MAJOR)
  list(GET parts 1 PACKAGE_FIND_VERSION_MINOR)
  list(GET parts 2 PACKAGE_FIND_VERSION_PATCH)
  set(PACKAGE_FIND_NAME gqe)
  set(PACKAGE_FIND_VERSION "${EXPECT_VERSION}")
  set(PACKAGE_FIND_VERSION_COUNT 3)
  set(CMAKE_SIZEOF_VOID_P 3)
  include("${path}")
  if(NOT PACKAGE_VERSION_COMPATIBLE OR PACKAGE_VERSION_UNSUITABLE)
    message(FATAL_ERROR "${path} rejects a project with another pointer size (it says"
                        " '${PACKAGE_VERSION}'): a header-only package must be ARCH_INDEPENDENT")
  endif()
  if(NOT PACKAGE_VERSION STREQUAL EXPECT_VERSION)
    message(FATAL_ERROR "${path} says version ${PACKAGE_VERSION}; expected ${EXPECT_VERSION}")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(config_args)
if(NOT "${BUILD_TYPE}" STREQUAL "")
  set(config_args --config "${BUILD_TYPE}")
endif()

set(configure_args -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX}" "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}"
                   "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}")
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()

# Checks what the consumer printed: the version, and GQE_GEMM as this build set it.
function(check_consumer_output output)
  message(STATUS "${MODE} consumer says:\n${output}")
  if(NOT output MATCHES "gqe ${EXPECT_VERSION}\n")
    message(FATAL_ERROR "the consumer did not print 'gqe ${EXPECT_VERSION}'")
  endif()
  if(NOT output MATCHES "gemm ${EXPECT_GEMM}\n")
    message(FATAL_ERROR "the consumer did not see GQE_GEMM as ${EXPECT_GEMM}: the option must reach it")
  endif()
endfunction()

if(MODE STREQUAL "find_package" OR MODE STREQUAL "pkg_config")
  if(NOT GQE_BINARY_DIR)
    message(FATAL_ERROR "run_consumer.cmake: -DGQE_BINARY_DIR=... is required for ${MODE}")
  endif()
  set(prefix "${WORK_DIR}/prefix")
  run("cmake --install" ${CMAKE_COMMAND} --install "${GQE_BINARY_DIR}" --prefix "${prefix}" ${config_args})
  require_file("${prefix}/include/gqe/gqe.hpp")
  require_file("${prefix}/include/gqe/version.hpp")
  require_file("${prefix}/share/pkgconfig/gqe.pc")
endif()

if(MODE STREQUAL "pkg_config")
  # As a Makefile would: flags from pkg-config, found through PKG_CONFIG_PATH, then the compiler.
  if(NOT PKG_CONFIG)
    find_program(PKG_CONFIG NAMES pkg-config pkgconf REQUIRED)
  endif()
  set(ENV{PKG_CONFIG_PATH} "${prefix}/share/pkgconfig")
  run("pkg-config --modversion gqe" "${PKG_CONFIG}" --modversion gqe)
  string(STRIP "${run_output}" version)
  if(NOT version STREQUAL EXPECT_VERSION)
    message(FATAL_ERROR "pkg-config says gqe ${version}; expected ${EXPECT_VERSION}")
  endif()
  run("pkg-config --cflags gqe" "${PKG_CONFIG}" --cflags gqe)
  string(STRIP "${run_output}" cflags)
  run("pkg-config --libs gqe" "${PKG_CONFIG}" --libs gqe)
  string(STRIP "${run_output}" libs)
  message(STATUS "pkg-config --cflags gqe: ${cflags}\npkg-config --libs gqe: ${libs}")
  # The include path must be the installed one, wherever --prefix put it.
  separate_arguments(cflags_list UNIX_COMMAND "${cflags}")
  set(found_headers FALSE)
  foreach(flag IN LISTS cflags_list)
    if(flag MATCHES "^-I(.*)$")
      file(REAL_PATH "${CMAKE_MATCH_1}" dir)
      file(REAL_PATH "${prefix}/include" want)
      if(dir STREQUAL want AND EXISTS "${dir}/gqe/gqe.hpp")
        set(found_headers TRUE)
      endif()
    endif()
  endforeach()
  if(NOT found_headers)
    message(FATAL_ERROR "pkg-config --cflags gqe gives no -I to ${prefix}/include: '${cflags}'")
  endif()
  string(TOUPPER "${EXPECT_GEMM}" gemm_macro)
  if(NOT EXPECT_GEMM STREQUAL "eigen" AND NOT cflags MATCHES "-DGQE_GEMM_${gemm_macro}=1")
    message(FATAL_ERROR "pkg-config --cflags gqe lacks -DGQE_GEMM_${gemm_macro}=1: '${cflags}'")
  endif()
  separate_arguments(libs_list UNIX_COMMAND "${libs}")
  separate_arguments(cxx_flags_list UNIX_COMMAND "${CXX_FLAGS}")
  set(app "${WORK_DIR}/app")
  run("compile the consumer with pkg-config's flags" "${CXX}" ${cxx_flags_list} -std=c++17 ${cflags_list}
      "${GQE_SOURCE_DIR}/tests/consumer/main.cpp" -o "${app}" ${libs_list})
  run("run the pkg-config consumer" "${app}")
  check_consumer_output("${run_output}")
  return()
endif()

if(MODE STREQUAL "find_package")
  set(package_dir "${prefix}/share/cmake/gqe")
  foreach(f gqeConfig.cmake gqeConfigVersion.cmake gqeTargets.cmake)
    require_file("${package_dir}/${f}")
  endforeach()
  # A header-only package must not be tied to the pointer size of the machine that installed it.
  # Asked for by a 32-bit project, the version file must still answer "compatible".
  check_version_file("${package_dir}/gqeConfigVersion.cmake")
  file(READ "${package_dir}/gqeTargets.cmake" targets_file)
  string(TOUPPER "${EXPECT_GEMM}" gemm_macro)
  if(NOT EXPECT_GEMM STREQUAL "eigen" AND NOT targets_file MATCHES "GQE_GEMM_${gemm_macro}=1")
    message(FATAL_ERROR "gqe::gqe was exported without the INTERFACE definition GQE_GEMM_${gemm_macro}=1")
  endif()

  string(REPLACE "|" ";" programs "${PROGRAMS}")
  foreach(program IN LISTS programs)
    require_file("${prefix}/bin/${program}")
  endforeach()
  if("gqe-demo" IN_LIST programs)
    # A short tour: every part runs, the training comparison reports both models.
    run("installed gqe-demo" "${prefix}/bin/gqe-demo" --tokens 256 --repeats 1 --train-steps 20)
    # At 256 tokens the timing is too short to compare, and the demo must say so.
    foreach(expected IN ITEMS "gqe ${EXPECT_VERSION}" "speed-up [0-9.]+x; FLOP ceiling [0-9.]+x. Not a measurement"
                              "dense GQA +[0-9]+ +8/8 " "GQE +[0-9]+ +5/8 ")
      if(NOT run_output MATCHES "${expected}")
        message(FATAL_ERROR "installed gqe-demo did not print '${expected}':\n${run_output}")
      endif()
    endforeach()
  endif()

  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}")
  # A project with its own nlohmann_json target, which forbids finding the installed package: the
  # package must take that target, not look for another.
  run("configure the find_package consumer with its own nlohmann_json" ${CMAKE_COMMAND}
      -S "${GQE_SOURCE_DIR}/tests/consumer/find_package" -B "${WORK_DIR}/build-own-json" ${configure_args} -DOWN_JSON=ON)
elseif(MODE STREQUAL "add_subdirectory")
  list(APPEND configure_args "-DGQE_SOURCE_DIR=${GQE_SOURCE_DIR}" "-DGQE_GEMM=${EXPECT_GEMM}")
elseif(MODE STREQUAL "fetch_content")
  # The source tree as a release archive would hold it: everything but .git and build trees.
  file(GLOB entries RELATIVE "${GQE_SOURCE_DIR}" "${GQE_SOURCE_DIR}/*")
  set(packed)
  foreach(entry IN LISTS entries)
    if(entry STREQUAL ".git" OR EXISTS "${GQE_SOURCE_DIR}/${entry}/CMakeCache.txt")
      continue()
    endif()
    list(APPEND packed "${entry}")
  endforeach()
  set(archive "${WORK_DIR}/gqe-${EXPECT_VERSION}.tar.gz")
  execute_process(COMMAND ${CMAKE_COMMAND} -E tar czf "${archive}" -- ${packed} WORKING_DIRECTORY "${GQE_SOURCE_DIR}"
                  RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "packing the source tree failed: ${err}")
  endif()
  list(APPEND configure_args "-DGQE_ARCHIVE=${archive}" "-DGQE_GEMM=${EXPECT_GEMM}"
                             "-DFETCHCONTENT_BASE_DIR=${WORK_DIR}/deps")
else()
  message(FATAL_ERROR "run_consumer.cmake: MODE is '${MODE}'; expected find_package, add_subdirectory, "
                      "fetch_content or pkg_config")
endif()

set(source "${GQE_SOURCE_DIR}/tests/consumer/${MODE}")
set(build "${WORK_DIR}/build")
run("configure the ${MODE} consumer" ${CMAKE_COMMAND} -S "${source}" -B "${build}" ${configure_args})
run("build the ${MODE} consumer" ${CMAKE_COMMAND} --build "${build}" ${config_args} --parallel 2)

set(app "${build}/app")
if(NOT EXISTS "${app}" AND NOT "${BUILD_TYPE}" STREQUAL "")
  set(app "${build}/${BUILD_TYPE}/app")  # multi-config generators
endif()
run("run the ${MODE} consumer" "${app}")
check_consumer_output("${run_output}")
