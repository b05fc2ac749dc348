#pragma once
// One training run of one model: its configuration, parameters, optimiser and history, the
// training loop with periodic evaluation, and saving and resuming.
//
// A run saved at step s and resumed continues to bit-identically the parameters of a run never
// interrupted: the parameters and the optimiser's moments are saved in the run's own scalar type,
// the batch of step s is a pure function of (seed, s), and every op gives the same bits for any
// thread count.
//
// Folder of a run (the checkpoint that gqe-run loads, and the training state beside it):
//   config.json, model.safetensors   save_checkpoint's, in F32 (float runs) or F64 (double runs)
//   optimizer.safetensors            exp_avg.<name> and exp_avg_sq.<name> of every parameter
//   train_state.json                 step, the run's configuration, loss and evaluation history
// The folder is replaced as a whole, safe against a crash at any step (gqe/io/run_folder.hpp):
// written beside it as <dir>.saving, train_state.json last, then swapped in by renames; a reader
// takes the newest complete copy.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "gqe/error.hpp"
#include "gqe/io/atomic_file.hpp"
#include "gqe/io/checkpoint.hpp"
#include "gqe/io/config_json.hpp"
#include "gqe/io/detail/json_text.hpp"
#include "gqe/io/run_folder.hpp"
#include "gqe/io/safetensors.hpp"
#include "gqe/training/data.hpp"
#include "gqe/training/initialize.hpp"
#include "gqe/training/loss.hpp"
#include "gqe/training/optimizer.hpp"
#include "gqe/util/system_memory.hpp"

namespace gqe::training {

enum class Task { mqar, text };
inline const char* to_string(Task t) { return t == Task::mqar ? "mqar" : "text"; }
inline Task task_from_string(const std::string& s) {
  if (s == "mqar") return Task::mqar;
  if (s == "text") return Task::text;
  fail<ConfigError>("task is \"", s, "\"; expected \"mqar\" or \"text\"");
}

// Everything that defines a run (saved in train_state.json, so that --resume needs nothing else).
struct RunConfig {
  ModelConfig model;
  OptimizerConfig optimizer;  // total_steps is the run's length
  Task task = Task::mqar;
  MqarConfig mqar;            // its seq_len is the run's sequence length for MQAR
  std::string text_path;      // Task::text
  double heldout_fraction = 0.1;
  Index batch = 16;
  Index seq_len = 128;
  double aux_coef = 0.01;
  std::uint64_t seed = 0;
  Index eval_every = 0;        // steps between evaluations (0: a tenth of the run)
  Index eval_batches = 4;      // batches per evaluation during training
  Index final_eval_batches = 16;
  Index save_every = 0;        // steps between saves (0: only at the end and on interruption)

  Index steps() const { return optimizer.total_steps; }
  Index eval_interval() const { return eval_every > 0 ? eval_every : std::max<Index>(1, steps() / 10); }

  void validate() const {
    model.validate();
    optimizer.validate();
    if (batch < 1 || batch > (1 << 16)) fail<ConfigError>("batch is ", batch, " sequences; expected 1 to ", 1 << 16);
    if (seq_len < 1 || seq_len > model.max_position_embeddings)
      fail<ConfigError>("sequence length is ", seq_len, "; expected 1 to max_position_embeddings = ",
                        model.max_position_embeddings);
    if (task == Task::mqar) {
      mqar.validate();
      if (mqar.seq_len != seq_len) fail<ConfigError>("MQAR sequence length ", mqar.seq_len, " differs from the run's ", seq_len);
      if (mqar.vocab_size != model.vocab_size)
        fail<ConfigError>("MQAR vocabulary ", mqar.vocab_size, " differs from the model's vocab_size ", model.vocab_size);
    } else {
      if (text_path.empty()) fail<ConfigError>("task text needs a text file (--text FILE)");
      TextData::check_heldout_fraction(heldout_fraction);
      if (model.vocab_size < 256)
        fail<ConfigError>("task text is byte-level; vocab_size is ", model.vocab_size, ", expected at least 256");
    }
    if (!(aux_coef >= 0) || !std::isfinite(aux_coef))
      fail<ConfigError>("aux loss coefficient is ", aux_coef, "; expected a finite number >= 0");
    if (eval_every < 0 || eval_batches < 1 || final_eval_batches < 1 || save_every < 0)
      fail<ConfigError>("evaluation every ", eval_every, " steps over ", eval_batches, " batches (final ",
                        final_eval_batches, "), saves every ", save_every, "; expected counts >= 0 (batches >= 1)");
  }
};

inline nlohmann::ordered_json to_json(const RunConfig& c) {
  nlohmann::ordered_json j;
  j["model"] = to_json(c.model);
  const OptimizerConfig& o = c.optimizer;
  j["optimizer"] = {{"lr", o.lr},
                    {"beta1", o.beta1},
                    {"beta2", o.beta2},
                    {"eps", o.eps},
                    {"weight_decay", o.weight_decay},
                    {"clip_norm", o.clip_norm},
                    {"warmup_steps", o.warmup_steps},
                    {"total_steps", o.total_steps},
                    {"schedule", to_string(o.schedule)},
                    {"min_lr_ratio", o.min_lr_ratio},
                    {"decay_fraction", o.decay_fraction}};
  j["task"] = to_string(c.task);
  j["mqar"] = {{"vocab_size", c.mqar.vocab_size}, {"seq_len", c.mqar.seq_len}, {"num_pairs", c.mqar.num_pairs}};
  j["text_path"] = c.text_path;
  j["heldout_fraction"] = c.heldout_fraction;
  j["batch"] = c.batch;
  j["seq_len"] = c.seq_len;
  j["aux_coef"] = c.aux_coef;
  j["seed"] = c.seed;
  j["eval_every"] = c.eval_every;
  j["eval_batches"] = c.eval_batches;
  j["final_eval_batches"] = c.final_eval_batches;
  j["save_every"] = c.save_every;
  return j;
}

inline RunConfig run_config_from_json(const nlohmann::json& j, const std::string& source) {
  try {
    RunConfig c;
    c.model = parse_model_config(j.at("model"), source + " (model)");
    const auto& o = j.at("optimizer");
    c.optimizer.lr = o.at("lr").get<double>();
    c.optimizer.beta1 = o.at("beta1").get<double>();
    c.optimizer.beta2 = o.at("beta2").get<double>();
    c.optimizer.eps = o.at("eps").get<double>();
    c.optimizer.weight_decay = o.at("weight_decay").get<double>();
    c.optimizer.clip_norm = o.at("clip_norm").get<double>();
    c.optimizer.warmup_steps = o.at("warmup_steps").get<Index>();
    c.optimizer.total_steps = o.at("total_steps").get<Index>();
    c.optimizer.schedule = schedule_from_string(o.at("schedule").get<std::string>());
    c.optimizer.min_lr_ratio = o.at("min_lr_ratio").get<double>();
    c.optimizer.decay_fraction = o.at("decay_fraction").get<double>();
    c.task = task_from_string(j.at("task").get<std::string>());
    c.mqar.vocab_size = j.at("mqar").at("vocab_size").get<Index>();
    c.mqar.seq_len = j.at("mqar").at("seq_len").get<Index>();
    c.mqar.num_pairs = j.at("mqar").at("num_pairs").get<Index>();
    c.text_path = j.at("text_path").get<std::string>();
    c.heldout_fraction = j.at("heldout_fraction").get<double>();
    c.batch = j.at("batch").get<Index>();
    c.seq_len = j.at("seq_len").get<Index>();
    c.aux_coef = j.at("aux_coef").get<double>();
    c.seed = j.at("seed").get<std::uint64_t>();
    c.eval_every = j.at("eval_every").get<Index>();
    c.eval_batches = j.at("eval_batches").get<Index>();
    c.final_eval_batches = j.at("final_eval_batches").get<Index>();
    c.save_every = j.at("save_every").get<Index>();
    c.validate();
    return c;
  } catch (const nlohmann::json::exception& e) {
    fail<FormatError>(source, ": the run configuration is malformed (", e.what(), ")");
  }
}

struct HistoryPoint {
  Index step = 0;  // steps done after this one (1-based)
  double loss = 0, lm_loss = 0, aux_loss = 0, lr = 0, grad_norm = 0;
};
struct EvalPoint {
  Index step = 0;
  double loss = 0, accuracy = 0;
};

// What the training loop reports after every step.
struct StepInfo {
  Index step = 0, total = 0;
  double loss = 0, lm_loss = 0, aux_loss = 0, lr = 0, grad_norm = 0;
  double tokens_per_second = 0;  // over this run's training time so far
  double seconds = 0;            // training time so far
};

namespace detail {
inline const char* kStateFormat = "gqe-train-state";
inline const char* kStateFile = "train_state.json";  // written last: its presence marks a complete save
}  // namespace detail

// The folder holding the newest complete save of the run in dir: dir, or a sibling that a crashed
// save left (see gqe/io/run_folder.hpp).
inline std::filesystem::path saved_run_folder(const std::filesystem::path& dir) {
  const auto folder = newest_saved_folder(dir, detail::kStateFile);
  if (folder.empty())
    fail<IoError>(dir.string(), " holds no train_state.json; expected the folder of a run saved by gqe-train");
  return folder;
}

// Refuses to train a model whose weights, gradients and AdamW's two moments alone (four Scalars a
// parameter) exceed the machine's physical memory, before any of it is allocated. The config is
// validated first: a negative size would otherwise count as a small model and pass.
template <class Scalar>
void check_fits_in_memory(const ModelConfig& model) {
  model.validate();
  const std::uint64_t memory = physical_memory_bytes();
  const double needed = 4.0 * sizeof(Scalar) * static_cast<double>(model.parameter_count());
  if (memory > 0 && needed > static_cast<double>(memory))
    fail<ConfigError>("training a model of ", model.parameter_count(), " parameters needs at least ", memory_size(needed),
                      " (its weights, gradients and AdamW's two moments, ", 4 * sizeof(Scalar),
                      " bytes a parameter); this machine has ", memory_size(static_cast<double>(memory)), " of memory");
}

template <class Scalar>
class Run {
 public:
  static constexpr DType kDType = std::is_same_v<Scalar, double> ? DType::F64 : DType::F32;

  // A fresh run: parameters initialised from the seed, step 0.
  explicit Run(const RunConfig& config)
      : config_((config.validate(), check_fits_in_memory<Scalar>(config.model), config)), model_(config.model) {
    initialize(model_, config_.seed);
    attach_gradients(model_);
    adam_ = AdamW<Scalar>(model_, config_.optimizer);
    open_data();
  }

  // Continues the run saved in dir (see saved_run_folder).
  static Run load(const std::filesystem::path& dir) {
    const auto folder = saved_run_folder(dir);
    const auto state_path = folder / "train_state.json";
    const nlohmann::json state = read_state(state_path);
    const RunConfig config = run_config_from_json(state.at("run"), state_path.string());
    check_saved_sizes(folder, config, state_path.string());
    Run run(config);
    run.restore_progress(state, state_path.string());
    run.load_parameters(folder);
    run.load_moments(folder / "optimizer.safetensors");
    run.adam_.set_step(run.step_);
    return run;
  }

  // Saves the whole run into dir (replaced as a whole, see the file comment).
  void save(const std::filesystem::path& dir) const {
    replace_folder(dir, detail::kStateFile, [&](const std::filesystem::path& saving) {
      save_checkpoint(model_, saving, kDType);
      std::vector<EncodedTensor> tensors;
      std::size_t i = 0;
      model_.for_each_parameter([&](const std::string& name, const Weight& w) {
        const auto dims = w.shape().dims();
        const std::vector<std::int64_t> shape(dims.begin(), dims.end());
        tensors.push_back(encode_tensor("exp_avg." + name, kDType, shape, adam_.exp_avg(i).data()));
        tensors.push_back(encode_tensor("exp_avg_sq." + name, kDType, shape, adam_.exp_avg_sq(i).data()));
        ++i;
      });
      write_safetensors(saving / "optimizer.safetensors", tensors);
      const std::string state = state_json().dump(1) + "\n";
      write_file_atomically(saving / detail::kStateFile, [&](std::ostream& out) { out << state; });
    });
  }

  // Makes the run `steps` steps long in all (at least the steps done): resuming with more steps goes
  // on training, and the learning-rate schedule and the evaluation interval follow the new length.
  // A finished run's final evaluation is redone at its new end.
  void set_total_steps(Index steps) {
    if (steps < std::max<Index>(step_, 1))
      fail<ConfigError>("steps is ", steps, "; expected at least the ", std::max<Index>(step_, 1), " the run has done");
    if (steps == config_.steps()) return;
    RunConfig changed = config_;
    changed.optimizer.total_steps = steps;
    changed.validate();
    config_ = changed;
    has_final_eval_ = false;
  }

  const RunConfig& config() const { return config_; }
  Index step() const { return step_; }
  bool finished() const { return step_ >= config_.steps(); }
  const Transformer<Scalar>& model() const { return model_; }
  const std::vector<HistoryPoint>& history() const { return history_; }
  const std::vector<EvalPoint>& evals() const { return evals_; }
  bool has_final_eval() const { return has_final_eval_; }
  const EvalPoint& final_eval() const { return final_eval_; }
  double train_seconds() const { return train_seconds_; }
  double tokens_per_second() const {
    return train_seconds_ > 0 ? static_cast<double>(step_ * config_.batch * config_.seq_len) / train_seconds_ : 0.0;
  }

  // The batch that step `step` trains on.
  void train_batch(Index step, Batch& out) const {
    if (config_.task == Task::mqar)
      mqar_batch(config_.mqar, config_.batch, config_.seed, static_cast<std::uint64_t>(step), out);
    else
      text_->train_batch(config_.batch, config_.seed, static_cast<std::uint64_t>(step), out);
  }

  // One optimiser step on the batch of the current step.
  StepInfo train_step() {
    if (finished()) fail<InputError>("the run has done all its ", config_.steps(), " steps");
    const auto start = std::chrono::steady_clock::now();
    train_batch(step_, batch_);
    zero_gradients(model_);
    const LossReport r = graph_.forward(model_, batch_, config_.aux_coef);
    if (!std::isfinite(r.loss))
      fail<InputError>("the loss is ", r.loss, " at step ", step_, "; training diverged (expected a finite loss; lower --lr?)");
    graph_.backward(model_);
    const double norm = clip_global_norm(model_, config_.optimizer.clip_norm);
    const double lr = learning_rate(config_.optimizer, step_);
    adam_.update(model_, lr);
    ++step_;
    train_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    history_.push_back({step_, r.loss, r.lm_loss, r.aux_loss, lr, norm});
    StepInfo info{step_, config_.steps(), r.loss, r.lm_loss, r.aux_loss, lr, norm, tokens_per_second(), train_seconds_};
    return info;
  }

  // Held-out loss and accuracy over `batches` batches (the same ones for every run of a task).
  EvalPoint evaluate(Index batches) {
    if (batches < 1) fail<ConfigError>("evaluation batches are ", batches, "; expected at least 1");
    double loss = 0, correct = 0, counted = 0;
    for (Index i = 0; i < batches; ++i) {
      if (config_.task == Task::mqar)
        mqar_batch(config_.mqar, config_.batch, kEvalSeed, static_cast<std::uint64_t>(i), batch_);
      else
        text_->heldout_batch(config_.batch, i * config_.batch, batch_);
      const LossReport r = graph_.forward(model_, batch_, 0.0);
      loss += r.lm_loss * r.counted;
      correct += r.correct;
      counted += r.counted;
    }
    return {step_, loss / counted, correct / counted};
  }

  // Trains until the run is finished or stop() returns true (checked after every step), evaluating
  // every eval_interval() steps and saving to dir every save_every steps and when it stops.
  // on_step(const StepInfo&) is called after every step. Returns true when the run finished (its
  // final evaluation done), false when stopped.
  template <class Stop, class OnStep>
  bool train(const std::filesystem::path& dir, Stop&& stop, OnStep&& on_step) {
    while (!finished()) {
      const StepInfo info = train_step();
      if (step_ % config_.eval_interval() == 0 || finished()) evals_.push_back(evaluate(config_.eval_batches));
      on_step(info);
      if (finished()) break;
      if (stop()) {
        save(dir);
        return false;
      }
      if (config_.save_every > 0 && step_ % config_.save_every == 0) save(dir);
    }
    if (!has_final_eval_) {
      final_eval_ = evaluate(config_.final_eval_batches);
      has_final_eval_ = true;
    }
    save(dir);
    return true;
  }

  static constexpr std::uint64_t kEvalSeed = 0x5eed0e7a1ull;  // held-out MQAR examples

 private:
  void open_data() {
    if (config_.task == Task::text)
      text_ = std::make_shared<TextData>(config_.text_path, config_.seq_len, config_.heldout_fraction);
  }

  // train_state.json, checked to be a gqe-train state of this run's scalar type.
  static nlohmann::json read_state(const std::filesystem::path& state_path) {
    nlohmann::json state = gqe::detail::read_json_file(state_path, "a gqe-train state", std::uintmax_t(1) << 32);
    const auto field_is = [&](const char* key, const char* expected) {
      return state.is_object() && state.contains(key) && state[key].is_string() && state[key].get_ref<const std::string&>() == expected;
    };
    if (!field_is("format", detail::kStateFormat))
      fail<FormatError>(state_path.string(), " is not a gqe-train state (its \"format\" is not \"", detail::kStateFormat, "\")");
    if (!field_is("scalar", dtype_name(kDType)))
      fail<FormatError>(state_path.string(), " was saved by a run in ", gqe::detail::describe_json(state.value("scalar", nlohmann::json())),
                        "; this run computes in ", dtype_name(kDType),
                        " and resumes only its own type (bit-identical continuation)");
    return state;
  }

  // The sizes a (perhaps edited) state promises must be those of the files beside it: checked from
  // the headers, before the run's parameters, gradients and moments are allocated.
  static void check_saved_sizes(const std::filesystem::path& folder, const RunConfig& config, const std::string& source) {
    const SafetensorsFile model = SafetensorsFile::read(folder / "model.safetensors", true);
    const SafetensorsFile moments = SafetensorsFile::read(folder / "optimizer.safetensors", true);
    const auto values = [](const SafetensorsFile& f) {
      std::size_t n = 0;
      for (const auto& t : f.tensors()) n += t.numel();
      return n;
    };
    const auto parameters = static_cast<std::size_t>(config.model.parameter_count());
    if (values(model) != parameters || values(moments) != 2 * parameters)
      fail<FormatError>(source, " describes a model of ", parameters, " parameters, but ", model.source(), " holds ",
                        values(model), " values and ", moments.source(), " ", values(moments),
                        "; expected the files saved with it (", parameters, " and ", 2 * parameters, ")");
  }

  // Step, clock, loss history and evaluations from the state.
  void restore_progress(const nlohmann::json& state, const std::string& source) {
    try {
      step_ = state.at("step").get<Index>();
      train_seconds_ = state.at("train_seconds").get<double>();
      for (const auto& h : state.at("history"))
        history_.push_back({h.at(0).get<Index>(), h.at(1).get<double>(), h.at(2).get<double>(), h.at(3).get<double>(),
                            h.at(4).get<double>(), h.at(5).get<double>()});
      for (const auto& e : state.at("evals")) evals_.push_back({e.at(0).get<Index>(), e.at(1).get<double>(), e.at(2).get<double>()});
      if (state.contains("final_eval") && !state.at("final_eval").is_null()) {
        const auto& f = state.at("final_eval");
        final_eval_ = EvalPoint{f.at(0).get<Index>(), f.at(1).get<double>(), f.at(2).get<double>()};
        has_final_eval_ = true;
      }
    } catch (const nlohmann::json::exception& e) {
      fail<FormatError>(source, ": the training state is malformed (", e.what(), ")");
    }
    if (step_ < 0 || step_ > config_.steps())
      fail<FormatError>(source, ": step ", step_, " is outside the run's 0 to ", config_.steps());
  }

  // Parameters: the checkpoint, in this run's own dtype (a converted one would not continue exactly).
  void load_parameters(const std::filesystem::path& folder) {
    const SafetensorsFile header = SafetensorsFile::read(folder / "model.safetensors", true);
    for (const auto& t : header.tensors())
      if (t.dtype != kDType)
        fail<FormatError>(header.source(), ": tensor ", t.name, " is ", dtype_name(t.dtype), "; resuming needs the run's own ",
                          dtype_name(kDType));
    model_ = load_checkpoint<Scalar>(folder, LoadOptions{true, false, true});
    attach_gradients(model_);
  }

  // The AdamW moments, one pair per parameter, in the model's parameter order.
  void load_moments(const std::filesystem::path& path) {
    const SafetensorsFile opt = SafetensorsFile::read(path);
    std::size_t count = 0;
    const auto read_moment = [&](const std::string& name, const Weight& w, std::vector<Scalar>& moment) {
      const TensorRecord& t = opt.at(name);
      if (t.dtype != kDType || Shape::of(t.shape) != w.shape())
        fail<FormatError>(opt.source(), ": tensor ", t.name, " is ", dtype_name(t.dtype), " ", t.shape_str(), "; expected ",
                          dtype_name(kDType), " ", w.shape().str());
      opt.read_into(t, moment.data());
    };
    model_.for_each_parameter([&](const std::string& name, const Weight& w) {
      read_moment("exp_avg." + name, w, adam_.exp_avg(count));
      read_moment("exp_avg_sq." + name, w, adam_.exp_avg_sq(count));
      ++count;
    });
    if (opt.tensors().size() != 2 * count)
      fail<FormatError>(opt.source(), " holds ", opt.tensors().size(), " tensors; expected ", 2 * count);
  }

  nlohmann::ordered_json state_json() const {
    nlohmann::ordered_json j;
    j["format"] = detail::kStateFormat;
    j["version"] = 1;
    j["scalar"] = dtype_name(kDType);
    j["step"] = step_;
    j["train_seconds"] = train_seconds_;
    j["tokens_per_second"] = tokens_per_second();
    j["parameters"] = config_.model.parameter_count();
    j["active_query_heads"] = config_.model.attention().active_heads();
    j["run"] = to_json(config_);
    j["final_eval"] = has_final_eval_ ? nlohmann::ordered_json::array({final_eval_.step, final_eval_.loss, final_eval_.accuracy})
                                      : nlohmann::ordered_json();
    auto& h = j["history"] = nlohmann::ordered_json::array();
    for (const auto& p : history_) h.push_back({p.step, p.loss, p.lm_loss, p.aux_loss, p.lr, p.grad_norm});
    auto& e = j["evals"] = nlohmann::ordered_json::array();
    for (const auto& p : evals_) e.push_back({p.step, p.loss, p.accuracy});
    return j;
  }

  RunConfig config_;
  Transformer<Scalar> model_;  // its own weights, each with its gradient attached
  AdamW<Scalar> adam_;         // the moments beside them
  LossAndGrad<Scalar> graph_;
  std::shared_ptr<TextData> text_;
  Batch batch_;
  Index step_ = 0;
  double train_seconds_ = 0;
  std::vector<HistoryPoint> history_;
  std::vector<EvalPoint> evals_;
  EvalPoint final_eval_;
  bool has_final_eval_ = false;
};

}  // namespace gqe::training
