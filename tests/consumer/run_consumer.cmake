# Builds and runs one consumer project of gqe the way a user would; any failed step fails loudly.
# cmake -DMODE=find_package|add_subdirectory -DGQE_SOURCE_DIR=... -DGQE_BINARY_DIR=... -DWORK_DIR=...
#       -DCXX=... -DBUILD_TYPE=... -DGENERATOR=... [-DMAKE_PROGRAM=...] [-DCXX_FLAGS=...]
#       -DEXPECT_VERSION=x.y.z -DEXPECT_GEMM=eigen|openblas|onednn [-DPROGRAMS=a|b] -P run_consumer.cmake
# find_package: installs GQE_BINARY_DIR into WORK_DIR/prefix, checks the installed package (config,
# arch-independent version file, headers, the example programs in PROGRAMS), then builds the consumer
# against it. add_subdirectory: builds the consumer with the gqe source tree inside it.
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

if(MODE STREQUAL "find_package")
  if(NOT GQE_BINARY_DIR)
    message(FATAL_ERROR "run_consumer.cmake: -DGQE_BINARY_DIR=... is required for find_package")
  endif()
  set(prefix "${WORK_DIR}/prefix")
  run("cmake --install" ${CMAKE_COMMAND} --install "${GQE_BINARY_DIR}" --prefix "${prefix}" ${config_args})

  require_file("${prefix}/include/gqe/gqe.hpp")
  require_file("${prefix}/include/gqe/version.hpp")
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
    foreach(expected IN ITEMS "gqe ${EXPECT_VERSION}" "speed-up [0-9.]+x; FLOP ceiling"
                              "dense GQA +[0-9]+ +8/8 " "GQE +[0-9]+ +5/8 ")
      if(NOT run_output MATCHES "${expected}")
        message(FATAL_ERROR "installed gqe-demo did not print '${expected}':\n${run_output}")
      endif()
    endforeach()
  endif()

  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}")
elseif(MODE STREQUAL "add_subdirectory")
  list(APPEND configure_args "-DGQE_SOURCE_DIR=${GQE_SOURCE_DIR}" "-DGQE_GEMM=${EXPECT_GEMM}")
else()
  message(FATAL_ERROR "run_consumer.cmake: MODE is '${MODE}'; expected find_package or add_subdirectory")
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
message(STATUS "${MODE} consumer says:\n${run_output}")
if(NOT run_output MATCHES "gqe ${EXPECT_VERSION}\n")
  message(FATAL_ERROR "the consumer did not print 'gqe ${EXPECT_VERSION}'")
endif()
if(NOT run_output MATCHES "gemm ${EXPECT_GEMM}\n")
  message(FATAL_ERROR "the consumer did not see GQE_GEMM as ${EXPECT_GEMM}: the option must reach it")
endif()
