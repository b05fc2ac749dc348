# Finds the GEMM backend named by GQE_GEMM (eigen, openblas or onednn): used by the project and,
# installed, by gqeConfig.cmake for the consumer. eigen needs nothing beyond Eigen itself.
macro(gqe_find_gemm_backend backend)
  if("${backend}" STREQUAL "openblas")
    if(NOT TARGET BLAS::BLAS)
      set(_gqe_saved_bla_vendor "${BLA_VENDOR}")
      set(BLA_VENDOR OpenBLAS)  # the library calls OpenBLAS's own thread-count functions
      find_package(BLAS REQUIRED)
      set(BLA_VENDOR "${_gqe_saved_bla_vendor}")
    endif()
  elseif("${backend}" STREQUAL "onednn")
    if(NOT TARGET DNNL::dnnl)
      # Debian's dnnl-config.cmake wants OpenCL's development files too (its GPU runtime), which the
      # CPU sgemm does not need: find the library and header directly.
      find_path(GQE_DNNL_INCLUDE_DIR dnnl.h)
      find_library(GQE_DNNL_LIBRARY dnnl)
      if(NOT GQE_DNNL_INCLUDE_DIR OR NOT GQE_DNNL_LIBRARY)
        message(FATAL_ERROR "GQE_GEMM=onednn: oneDNN (dnnl.h, libdnnl) not found; on Debian: apt-get install libdnnl-dev")
      endif()
      add_library(DNNL::dnnl UNKNOWN IMPORTED)
      set_target_properties(DNNL::dnnl PROPERTIES IMPORTED_LOCATION "${GQE_DNNL_LIBRARY}"
                                                  INTERFACE_INCLUDE_DIRECTORIES "${GQE_DNNL_INCLUDE_DIR}")
    endif()
    if(NOT TARGET OpenMP::OpenMP_CXX)
      find_package(OpenMP REQUIRED)  # oneDNN runs on OpenMP; the library sets its team size per call
    endif()
  elseif(NOT "${backend}" STREQUAL "eigen")
    message(FATAL_ERROR "GQE_GEMM is \"${backend}\"; expected eigen, openblas or onednn")
  endif()
endmacro()
