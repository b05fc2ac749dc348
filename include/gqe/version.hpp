#pragma once
// Library version; kept equal to project(VERSION) in the top-level CMakeLists.txt (a test checks).
#define GQE_VERSION_MAJOR 0
#define GQE_VERSION_MINOR 3
#define GQE_VERSION_PATCH 0
#define GQE_VERSION_STRING "0.3.0"
