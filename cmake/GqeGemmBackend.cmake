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
      find_package(dnnl CONFIG REQUIRED)
    endif()
    if(NOT TARGET OpenMP::OpenMP_CXX)
      find_package(OpenMP REQUIRED)  # oneDNN runs on OpenMP; the library sets its team size per call
    endif()
  elseif(NOT "${backend}" STREQUAL "eigen")
    message(FATAL_ERROR "GQE_GEMM is \"${backend}\"; expected eigen, openblas or onednn")
  endif()
endmacro()
