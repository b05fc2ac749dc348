# Finds Eigen 3.4 or 5.x. Eigen 5's version file refuses a request for "3.4", so the find is
# unversioned and the version is checked here.
if(NOT TARGET Eigen3::Eigen)
  find_package(Eigen3 REQUIRED NO_MODULE)
endif()
if(DEFINED Eigen3_VERSION AND Eigen3_VERSION VERSION_LESS 3.4)
  message(FATAL_ERROR "gqe needs Eigen 3.4 or newer; found Eigen ${Eigen3_VERSION}")
endif()
