// Uses gqe through its public headers only, as any consumer project would; built by every consumer
// project (find_package, add_subdirectory, FetchContent and pkg-config).
#include <cstdio>

#include "gqe/gqe.hpp"

int main() {
  gqe::ModelConfig config;
  config.vocab_size = 64;
  config.hidden_size = 32;
  config.intermediate_size = 64;
  config.num_layers = 2;
  config.attention_type = gqe::AttentionType::gqe;
  config.num_heads = 8;     // N
  config.num_kv_heads = 4;  // G, so M = 2
  config.head_dim = 8;
  config.top_k = 1;
  config.validate();

  gqe::ModelConfig bad = config;
  bad.top_k = 3;  // more than M experts per group
  bool rejected = false;
  try {
    bad.validate();
  } catch (const gqe::ConfigError&) {
    rejected = true;
  }
  if (!rejected) {
    std::fprintf(stderr, "an invalid config was accepted\n");
    return 1;
  }

  gqe::Tensor<float> x(gqe::Shape{3, config.hidden_size});  // [T, d]
  x.fill(0.25f);
  const float sum = x.matrix().sum();
  if (sum != 0.25f * 3 * 32) {
    std::fprintf(stderr, "tensor sum %f\n", static_cast<double>(sum));
    return 1;
  }

  std::printf("gqe %s\n", GQE_VERSION_STRING);
  std::printf("active heads per token %td\n", config.attention().active_heads());
  std::printf("gemm %s\n", gqe::backend::kName);
  return 0;
}
