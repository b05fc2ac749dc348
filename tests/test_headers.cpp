// The version macros agree with project(VERSION); the umbrella header of inference, gqe/gqe.hpp,
// includes every public header outside gqe/training/ and no header of training, directly or through
// another; gqe/training.hpp includes gqe/gqe.hpp and every training header. (That each header
// compiles on its own is shown by the generated translation units linked into this same executable,
// one per header.)
#include <gtest/gtest.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "gqe/version.hpp"

namespace {

// Public headers relative to include/, from the CMake glob: "gqe/error.hpp", ... (detail/ excluded).
const std::vector<std::string> kPublicHeaders = {
#include "gqe_public_headers.inc"
};

// The paths of the lines `#include "gqe/..."` or `#include <gqe/...>` of a file.
std::set<std::string> included_paths(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << "cannot open " << path;
  std::set<std::string> paths;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::string directive, target;
    if (!(words >> directive)) continue;
    if (directive == "#include") {
      words >> target;
    } else if (directive == "#" && words >> directive && directive == "include") {
      words >> target;
    } else {
      continue;
    }
    if (target.size() > 2 && (target.front() == '"' || target.front() == '<'))
      paths.insert(target.substr(1, target.size() - 2));
  }
  return paths;
}

TEST(Version, MacrosMatchTheCMakeProjectVersion) {
  EXPECT_EQ(GQE_VERSION_MAJOR, GQE_PROJECT_VERSION_MAJOR);
  EXPECT_EQ(GQE_VERSION_MINOR, GQE_PROJECT_VERSION_MINOR);
  EXPECT_EQ(GQE_VERSION_PATCH, GQE_PROJECT_VERSION_PATCH);
  EXPECT_STREQ(GQE_VERSION_STRING, GQE_PROJECT_VERSION_STRING);
  const std::string joined = std::to_string(GQE_VERSION_MAJOR) + "." + std::to_string(GQE_VERSION_MINOR) +
                             "." + std::to_string(GQE_VERSION_PATCH);
  EXPECT_EQ(joined, GQE_VERSION_STRING);
}

bool is_training(const std::string& header) {
  return header == "gqe/training.hpp" || header.rfind("gqe/training/", 0) == 0;
}
std::string path_of(const std::string& header) { return std::string(GQE_INCLUDE_DIR) + "/" + header; }

TEST(Umbrella, IncludesEveryPublicHeader) {
  ASSERT_FALSE(kPublicHeaders.empty());
  const std::set<std::string> inference = included_paths(GQE_UMBRELLA_HEADER);
  const std::set<std::string> training = included_paths(path_of("gqe/training.hpp"));
  EXPECT_EQ(training.count("gqe/gqe.hpp"), 1u) << "gqe/training.hpp does not include gqe/gqe.hpp";
  for (const std::string& header : kPublicHeaders) {
    if (header == "gqe/gqe.hpp" || header == "gqe/training.hpp") continue;
    if (is_training(header))
      EXPECT_EQ(training.count(header), 1u) << "gqe/training.hpp does not include " << header;
    else
      EXPECT_EQ(inference.count(header), 1u) << GQE_UMBRELLA_HEADER << " does not include " << header;
  }
}

TEST(Umbrella, IncludesOnlyExistingPublicHeaders) {
  const std::set<std::string> known(kPublicHeaders.begin(), kPublicHeaders.end());
  for (const char* umbrella : {"gqe/gqe.hpp", "gqe/training.hpp"})
    for (const std::string& path : included_paths(path_of(umbrella))) {
      if (path.rfind("gqe/", 0) != 0) continue;
      EXPECT_EQ(known.count(path), 1u) << umbrella << " includes " << path
                                       << ", which is not a public header (detail/ headers are internal)";
    }
}

// Inference brings in no training code: no header outside gqe/training/ includes one inside it.
TEST(Umbrella, InferenceHeadersIncludeNoTrainingHeader) {
  for (const std::string& header : kPublicHeaders) {
    if (is_training(header)) continue;
    for (const std::string& path : included_paths(path_of(header)))
      EXPECT_FALSE(is_training(path)) << header << " includes " << path;
  }
}

}  // namespace
