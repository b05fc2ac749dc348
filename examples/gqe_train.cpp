// gqe-train: trains a dense GQA model and a GQE model (k = 1 of M = 2, variant gqe) of the same
// shape under the same token budget and seeds, on multi-query associative recall (MQAR) or
// byte-level text, and compares them side by side: parameters, active query heads per token,
// held-out loss and accuracy (mean and spread over seeds), training tokens/s; --models trains one of
// the two alone (tools/gqe_sweep.py runs one configuration at a time). Writes checkpoints
// that gqe-run loads, loss curves as CSV and a PNG plot (with gnuplot, when installed).
//
// Nothing is lost: every run saves every --save-every steps and on Ctrl-C, and --resume continues
// a run (or a whole comparison) to bit-identically the result of an uninterrupted one.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "gqe/training.hpp"
#include "train_common.hpp"

namespace {

namespace fs = std::filesystem;
using gqe::Index;
using gqe::cli::Options;
using gqe::cli::Progress;
using gqe::cli::RunConfig;
using gqe::cli::make_run;
using gqe::cli::run_name;
using gqe::cli::train_flops;
using Run = gqe::cli::TrainRun;

volatile std::sig_atomic_t g_interrupted = 0;
extern "C" void on_sigint(int) { g_interrupted = 1; }

// A path as a message shows it: control characters escaped, so that it stays on its line.
std::string shown(const fs::path& path) { return gqe::detail::one_line(path.string()); }

// A path quoted for a POSIX shell (and so for gnuplot's single-quoted strings, by doubling).
std::string shell_quoted(const std::string& text) {
  std::string out = "'";
  for (const char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}
std::string gnuplot_quoted(const std::string& text) {
  std::string out = "'";
  for (const char c : text) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

// Trains one run to its end (or until Ctrl-C). Returns false when interrupted; `resume_hint` is the
// folder to name in the message then.
bool train_run(Run& run, const fs::path& dir, const std::string& label, const fs::path& resume_hint) {
  Progress progress(label);
  const bool done = run.train(dir, [] { return g_interrupted != 0; },
                              [&](const gqe::training::StepInfo& s) { progress.update(s, run); });
  if (!done) {
    std::fprintf(stderr, "\ninterrupted at step %ld of %ld; saved to %s (continue with --resume %s)\n",
                 static_cast<long>(run.step()), static_cast<long>(run.config().steps()), shown(dir).c_str(),
                 shown(resume_hint).c_str());
  }
  return done;
}

struct Stats {
  double mean = 0, sd = 0;
};
Stats stats(const std::vector<double>& v) {
  Stats s;
  if (v.empty()) return s;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  if (v.size() > 1) {
    for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(s.sd / static_cast<double>(v.size() - 1));
  }
  return s;
}

// The same with the attention as this implementation computes it: forward (scores, values), one
// more score pass for the log-sum-exp, and a backward that recomputes the scores (scores, dP, dV,
// dQ, dK): 8 products per score pair where the FLOP model counts 6.
double train_flops_recompute(const gqe::ModelConfig& m, Index T) {
  const double t = static_cast<double>(T);
  const double attention = 4 * static_cast<double>(m.attention().active_heads() * m.head_dim) * t * (t + 1) / 2;
  return train_flops(m, T) + static_cast<double>(m.num_layers) * attention;
}

// Writes the curves (CSV) and, when gnuplot is installed, a PNG of them.
void write_curves(const fs::path& out, const std::vector<std::pair<std::string, const Run*>>& runs) {
  {
    std::ostringstream csv;
    csv << "run,step,loss,lm_loss,aux_loss,lr,grad_norm\n";
    for (const auto& [name, run] : runs)
      for (const auto& h : run->history())
        csv << name << ',' << h.step << ',' << h.loss << ',' << h.lm_loss << ',' << h.aux_loss << ',' << h.lr << ','
            << h.grad_norm << '\n';
    const std::string text = csv.str();
    gqe::write_file_atomically(out / "loss_curves.csv", [&](std::ostream& o) { o << text; });
  }
  {
    std::ostringstream csv;
    csv << "run,step,heldout_loss,heldout_accuracy\n";
    for (const auto& [name, run] : runs)
      for (const auto& e : run->evals()) csv << name << ',' << e.step << ',' << e.loss << ',' << e.accuracy << '\n';
    const std::string text = csv.str();
    gqe::write_file_atomically(out / "eval_curves.csv", [&](std::ostream& o) { o << text; });
  }
  // Wide files for plotting: one column per run; training loss smoothed (EMA, bias-corrected).
  std::ostringstream train, eval;
  std::size_t longest = 0;
  train << "step";
  eval << "step";
  for (const auto& [name, run] : runs) {
    train << ',' << name;
    eval << ',' << name;
    longest = std::max(longest, run->history().size());
  }
  train << '\n';
  eval << '\n';
  std::vector<double> ema(runs.size(), 0), weight(runs.size(), 0);
  for (std::size_t i = 0; i < longest; ++i) {
    train << i + 1;
    for (std::size_t r = 0; r < runs.size(); ++r) {
      const auto& h = runs[r].second->history();
      train << ',';
      if (i < h.size()) {
        ema[r] = 0.98 * ema[r] + 0.02 * h[i].lm_loss;
        weight[r] = 0.98 * weight[r] + 0.02;
        train << ema[r] / weight[r];
      } else {
        train << "NaN";
      }
    }
    train << '\n';
  }
  std::map<Index, std::vector<std::string>> rows;
  for (std::size_t r = 0; r < runs.size(); ++r)
    for (const auto& e : runs[r].second->evals()) {
      auto& row = rows[e.step];
      row.resize(runs.size(), "NaN");
      row[r] = std::to_string(e.accuracy);
    }
  for (auto& [step, row] : rows) {
    row.resize(runs.size(), "NaN");
    eval << step;
    for (const auto& v : row) eval << ',' << v;
    eval << '\n';
  }
  const std::string train_text = train.str(), eval_text = eval.str();
  gqe::write_file_atomically(out / "plot_train_loss.csv", [&](std::ostream& o) { o << train_text; });
  gqe::write_file_atomically(out / "plot_heldout_accuracy.csv", [&](std::ostream& o) { o << eval_text; });

  const fs::path script = out / "plot.gnuplot";
  {
    std::ostringstream g;
    g << "set datafile separator ','\n"
      << "set terminal pngcairo size 1400,560 font ',10'\n"
      << "set output " << gnuplot_quoted((out / "training_curves.png").string()) << "\n"
      << "set multiplot layout 1,2 title 'GQA vs GQE: same shape, tokens and seeds'\n"
      << "set key outside bottom center horizontal\nset grid\nset xlabel 'step'\n"
      << "set ylabel 'training loss (EMA)'\nset logscale y\n"
      << "plot for [i=2:" << runs.size() + 1 << "] " << gnuplot_quoted((out / "plot_train_loss.csv").string())
      << " using 1:i with lines lw 1.5 lc (i % 2 == 0 ? 1 : 7) title columnhead(i)\n"
      << "unset logscale y\nset ylabel 'held-out accuracy'\nset yrange [0:1]\n"
      << "plot for [i=2:" << runs.size() + 1 << "] " << gnuplot_quoted((out / "plot_heldout_accuracy.csv").string())
      << " using 1:i with linespoints lw 1.5 pt 7 ps 0.5 lc (i % 2 == 0 ? 1 : 7) title columnhead(i)\n"
      << "unset multiplot\n";
    const std::string text = g.str();
    gqe::write_file_atomically(script, [&](std::ostream& o) { o << text; });
  }
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    std::fprintf(stderr, "warning: gnuplot is not installed; no PNG (apt-get install gnuplot-nox; then gnuplot %s)\n",
                 shown(script).c_str());
    return;
  }
  const std::string command = "gnuplot " + shell_quoted(script.string()) + " 2> " + shell_quoted((out / "plot.log").string());
  if (std::system(command.c_str()) != 0)
    std::fprintf(stderr, "warning: gnuplot failed (see %s); no PNG\n", shown(out / "plot.log").c_str());
  else
    std::fprintf(stderr, "plot: %s\n", shown(out / "training_curves.png").c_str());
}

void print_table(const Options& o, const std::vector<std::vector<const Run*>>& by_model, const fs::path& out) {
  std::ostringstream t;
  const bool mqar = o.task == "mqar";
  char line[512];
  std::snprintf(line, sizeof line, "| %-5s | %10s | %20s | %23s | %23s | %16s |\n", "model", "parameters",
                "active q-heads/token", "held-out loss", mqar ? "held-out MQAR acc." : "held-out accuracy",
                "train tokens/s");
  t << line << "|-------|-----------:|---------------------:|------------------------:|------------------------:|-----------------:|\n";
  for (const auto& runs : by_model) {
    if (runs.empty()) continue;
    std::vector<double> loss, acc, speed;
    for (const Run* r : runs) {
      loss.push_back(r->final_eval().loss);
      acc.push_back(r->final_eval().accuracy);
      speed.push_back(r->tokens_per_second());
    }
    const auto& m = runs.front()->config().model;
    const Stats l = stats(loss), a = stats(acc), s = stats(speed);
    char heads[32], ls[64], as[64], ss[32];
    std::snprintf(heads, sizeof heads, "%ld of %ld", static_cast<long>(m.attention().active_heads()),
                  static_cast<long>(m.num_heads));
    if (runs.size() > 1) {
      std::snprintf(ls, sizeof ls, "%.4f ± %.4f", l.mean, l.sd);
      std::snprintf(as, sizeof as, "%.4f ± %.4f", a.mean, a.sd);
    } else {  // one seed: no spread to show (a "± 0.0000" would claim one)
      std::snprintf(ls, sizeof ls, "%.4f", l.mean);
      std::snprintf(as, sizeof as, "%.4f", a.mean);
    }
    std::snprintf(ss, sizeof ss, "%.0f", s.mean);
    // "±" is two bytes: one more in the width keeps the columns aligned.
    const int width = runs.size() > 1 ? 24 : 23;
    std::snprintf(line, sizeof line, "| %-5s | %10ld | %20s | %*s | %*s | %16s |\n",
                  m.attention_type == gqe::AttentionType::gqa ? "GQA" : "GQE", static_cast<long>(m.parameter_count()),
                  heads, width, ls, width, as, ss);
    t << line;
  }
  char foot[256];
  const auto seeds = static_cast<std::size_t>(o.seeds);
  std::snprintf(foot, sizeof foot, "\n%s %zu seed%s; %ld steps x %ld sequences x %ld tokens\n",
                seeds > 1 ? "mean ± sample standard deviation over" : "one run each, no spread:", seeds, seeds > 1 ? "s" : "",
                static_cast<long>(o.steps), static_cast<long>(o.batch), static_cast<long>(o.seq_len));
  t << foot;
  const std::string text = t.str();
  std::fputs(text.c_str(), stdout);
  std::fflush(stdout);
  gqe::write_file_atomically(out / "results.md", [&](std::ostream& f) { f << text; });
}

// Times training steps of both models at the options' shape and prints the ratio beside the FLOP
// ceiling. The models alternate, a few steps each, over several rounds, and each model's median
// round is taken, so that other load on the machine hits both alike; process CPU time is reported
// beside wall-clock time for the same reason. No file is written.
int measure_throughput(const Options& o) {
  constexpr int kRounds = 7;
  const Index per_round = std::max<Index>(1, std::min<Index>(o.steps, 2));
  Options copy = o;
  copy.steps = 1 + kRounds * per_round;
  std::vector<Run> runs;
  runs.reserve(2);
  runs.emplace_back(make_run(copy, gqe::AttentionType::gqa, 0));
  runs.emplace_back(make_run(copy, gqe::AttentionType::gqe, 0));
  for (auto& r : runs) r.train_step();  // warm-up: buffers grow once
  std::vector<double> wall[2], cpu[2];
  const double tokens = static_cast<double>(per_round * o.batch * o.seq_len);
  for (int round = 0; round < kRounds; ++round)
    for (int i = 0; i < 2; ++i) {
      const std::clock_t c0 = std::clock();
      const auto start = std::chrono::steady_clock::now();
      for (Index s = 0; s < per_round; ++s) runs[static_cast<std::size_t>(i)].train_step();
      wall[i].push_back(tokens / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      cpu[i].push_back(tokens / (static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC));
    }
  const auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const auto& gqa = runs[0].config().model;
  const auto& gqe_model = runs[1].config().model;
  const double ceiling = train_flops(gqa, o.seq_len) / train_flops(gqe_model, o.seq_len);
  const double recompute = train_flops_recompute(gqa, o.seq_len) / train_flops_recompute(gqe_model, o.seq_len);
  const double g = median(wall[0]), e = median(wall[1]);
  std::printf("| seq len | GQA tokens/s | GQE tokens/s | GQE/GQA wall | GQE/GQA CPU time | FLOP ceiling (FLOP model, fwd+bwd) | FLOP ceiling (as computed) |\n");
  std::printf("|--------:|-------------:|-------------:|-------------:|-----------------:|-----------------------------------:|---------------------------:|\n");
  std::printf("| %7ld | %12.0f | %12.0f | %12.3f | %16.3f | %34.3f | %26.3f |\n", static_cast<long>(o.seq_len), g, e, e / g,
              median(cpu[1]) / median(cpu[0]), ceiling, recompute);
  std::printf("\nmedians of %d alternating rounds of %ld steps x %ld sequences x %ld tokens, %d thread(s)\n", kRounds,
              static_cast<long>(per_round), static_cast<long>(o.batch), static_cast<long>(o.seq_len), gqe::num_threads());
  return 0;
}

// A run's folder and the folders beside it are locked through the folder that holds them (the
// comparison's --out): one gqe-train at a time writes there.
gqe::FolderLock lock_comparison(const fs::path& out) { return gqe::FolderLock(out, "a gqe-train run writes there"); }

// `steps`: --steps given with --resume, the runs' new total length.
int run_comparison(Options o, std::optional<Index> steps) {
  std::error_code ec;
  // Paths resolved before anything starts: "--resume ." names the folder itself, and a relative
  // --text stays valid when the comparison is resumed from another working folder.
  fs::path out = gqe::resolved_folder(o.out);
  if (!o.text.empty()) o.text = fs::weakly_canonical(fs::absolute(o.text), ec).string();
  gqe::FolderLock lock;
  // --resume: a run's folder (continue that run) or a comparison's folder (continue all of it).
  if (!o.resume.empty()) {
    const fs::path dir = gqe::resolved_folder(o.resume);
    if (fs::is_regular_file(dir / "comparison.json", ec)) {
      lock = lock_comparison(dir);
      const fs::path saved = dir / "comparison.json";
      o.from_json(gqe::detail::read_json_file(saved, "the options of a gqe-train comparison", 1 << 20), saved.string());
      if (steps) o.steps = *steps;
      out = dir;
    } else {
      lock = lock_comparison(dir.parent_path());
      auto run = Run::load(dir);  // throws IoError naming dir when it is neither
      if (steps) run.set_total_steps(*steps);
      const std::string label = dir.filename().string();
      if ((!run.finished() || !run.has_final_eval()) && !train_run(run, dir, label, dir)) return 130;
      std::printf("%s: step %ld of %ld, held-out loss %.4f, accuracy %.4f, %.0f training tokens/s\n",
                  gqe::detail::one_line(label).c_str(), static_cast<long>(run.step()), static_cast<long>(run.config().steps()),
                  run.final_eval().loss, run.final_eval().accuracy, run.tokens_per_second());
      return 0;
    }
  }
  const std::vector<gqe::AttentionType> types = gqe::cli::model_types(o.models);
  // Validate every run's configuration and size, and the text file, before anything is written.
  for (Index s = 0; s < o.seeds; ++s)
    for (auto type : types) gqe::training::check_fits_in_memory<float>(make_run(o, type, static_cast<std::uint64_t>(s)).model);
  if (o.task == "text") gqe::training::TextData check(o.text, o.seq_len);
  if (!lock.held()) {
    fs::create_directories(out, ec);
    if (ec) gqe::fail<gqe::IoError>("cannot create --out folder ", out.string(), ": ", ec.message());
    lock = lock_comparison(out);  // before the check below: a second gqe-train started at once is refused here
    for (Index s = 0; s < o.seeds; ++s)
      for (auto type : types)
        for (const char* suffix : {"", ".old", ".saving"})
          if (fs::exists(out / (run_name(type, s) + suffix), ec))
            gqe::fail<gqe::InputError>("--out ", out.string(), " already holds ", run_name(type, s), suffix,
                                       "/; expected a new folder (or --resume ", out.string(), " to continue it)");
  }
  const std::string comparison = o.to_json().dump(2) + "\n";
  gqe::write_file_atomically(out / "comparison.json", [&](std::ostream& f) { f << comparison; });

  std::vector<Run> runs;
  runs.reserve(types.size() * static_cast<std::size_t>(o.seeds));
  std::vector<std::pair<std::string, const Run*>> named;
  for (Index s = 0; s < o.seeds; ++s)
    for (auto type : types) {
      const std::string name = run_name(type, s);
      const fs::path dir = out / name;
      if (!gqe::newest_saved_folder(dir, "train_state.json").empty()) {
        runs.push_back(Run::load(dir));
        runs.back().set_total_steps(o.steps);
      } else {
        runs.emplace_back(make_run(o, type, static_cast<std::uint64_t>(s)));
      }
      Run& run = runs.back();
      if (!run.finished() || !run.has_final_eval()) {
        if (!train_run(run, dir, name, out)) return 130;
      }
      named.emplace_back(name, &run);
    }
  std::vector<std::vector<const Run*>> by_model(2);
  for (const auto& [name, run] : named) by_model[name.rfind("gqa", 0) == 0 ? 0 : 1].push_back(run);
  std::printf("\n");
  print_table(o, by_model, out);
  write_curves(out, named);
  const std::string first = run_name(types.back(), 0);
  std::fprintf(stderr, "checkpoints: %s/%s-seed<S>/ (gqe-run --model %s/%s ...)\n", shown(out).c_str(),
               types.size() == 2 ? "{gqa,gqe}" : first.substr(0, 3).c_str(), shown(out).c_str(), first.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Trains a dense GQA and a GQE transformer of the same shape on the same tokens and seeds, and compares them",
               "gqe-train"};
  app.set_version_flag("--version", GQE_VERSION_STRING);
  Options o;
  app.add_option("--task", o.task, "mqar (multi-query associative recall) or text (byte-level LM on --text)")
      ->check(CLI::IsMember({"mqar", "text"}))->capture_default_str();
  app.add_option("--text", o.text, "text file for --task text (its last 10% is held out)");
  app.add_option("--models", o.models, "models to train: gqa,gqe (both, side by side), gqa or gqe")->capture_default_str();
  app.add_option("--steps", o.steps, "optimiser steps per run")->transform(gqe::cli::integer_in<Index>(1, 10000000))->capture_default_str();
  app.add_option("--batch", o.batch, "sequences per step")->transform(gqe::cli::integer_in<Index>(1, 65536))->capture_default_str();
  app.add_option("--seeds", o.seeds, "runs seeds 0..N-1 of each model")->transform(gqe::cli::integer_in<Index>(1, 1000))->capture_default_str();
  app.add_option("--seq-len", o.seq_len, "tokens per sequence")->transform(gqe::cli::integer_in<Index>(1, 1 << 20))->capture_default_str();
  app.add_option("--out", o.out, "output folder: checkpoints, curves, plot, results")->capture_default_str();
  app.add_option("--threads", o.threads, "threads (default: the CPUs this process may use)")->transform(gqe::cli::integer_in<Index>(1, 1024));
  app.add_option("--resume", o.resume, "continue a run's folder (out/gqe-seed0) or a whole comparison's (out)");
  app.add_option("--lr", o.lr, "peak learning rate")->transform(gqe::cli::decimal_in(1e-12, 10.0))->capture_default_str();
  app.add_option("--warmup", o.warmup, "warm-up steps (0: 5% of the steps)")->transform(gqe::cli::integer_in<Index>(0, std::numeric_limits<Index>::max()));
  app.add_option("--schedule", o.schedule, "cosine or wsd (warmup-stable-decay)")
      ->check(CLI::IsMember({"cosine", "wsd"}))->capture_default_str();
  app.add_option("--aux-coef", o.aux_coef, "load-balancing loss coefficient (GQE)")
      ->transform(gqe::cli::decimal_in(0.0, std::numeric_limits<double>::infinity()))->capture_default_str();
  app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay (matrices only)")
      ->transform(gqe::cli::decimal_in(0.0, 1.0))->capture_default_str();
  app.add_option("--eval-every", o.eval_every, "steps between held-out evaluations (0: a tenth of the run)")
      ->transform(gqe::cli::integer_in<Index>(0, std::numeric_limits<Index>::max()));
  app.add_option("--save-every", o.save_every, "steps between checkpoints (0: at the end and on Ctrl-C only)")
      ->transform(gqe::cli::integer_in<Index>(0, std::numeric_limits<Index>::max()))->capture_default_str();
  app.add_option("--hidden", o.hidden, "hidden size d")->transform(gqe::cli::integer_in<Index>(1, 65536))->capture_default_str();
  app.add_option("--layers", o.layers, "transformer blocks")->transform(gqe::cli::integer_in<Index>(1, 1024))->capture_default_str();
  app.add_option("--heads", o.heads, "query heads N (GQE: routed experts)")->transform(gqe::cli::integer_in<Index>(1, 1024))->capture_default_str();
  app.add_option("--kv-heads", o.kv_heads, "KV heads G")->transform(gqe::cli::integer_in<Index>(1, 1024))->capture_default_str();
  app.add_option("--head-dim", o.head_dim, "head dimension d_h")->transform(gqe::cli::integer_in<Index>(2, 2048))->capture_default_str();
  app.add_option("--intermediate", o.intermediate, "feed-forward size")->transform(gqe::cli::integer_in<Index>(1, 1 << 18))->capture_default_str();
  app.add_option("--top-k", o.top_k, "GQE experts kept per group")->transform(gqe::cli::integer_in<Index>(1, 1024))->capture_default_str();
  app.add_option("--variant", o.variant, "GQE variant: gqe, hard_concat or weighted_concat")
      ->check(CLI::IsMember({"gqe", "hard_concat", "weighted_concat"}))->capture_default_str();
  app.add_option("--mqar-pairs", o.mqar_pairs, "MQAR key-value pairs per sequence")->transform(gqe::cli::integer_in<Index>(1, 1 << 20))->capture_default_str();
  app.add_option("--mqar-vocab", o.mqar_vocab, "MQAR vocabulary (keys and values split it)")->transform(gqe::cli::integer_in<Index>(5, 1 << 20))->capture_default_str();
  app.add_flag("--throughput", o.throughput, "only time training steps of both models at this shape and print the ratio beside the FLOP ceiling");
  return gqe::cli::run_main(app, argc, argv, [&]() -> int {
    if (o.task == "text" && o.text.empty() && o.resume.empty())
      gqe::fail<gqe::ConfigError>("--task text needs --text FILE");
    // --resume continues with the saved settings: --steps (the new total) and --threads are the
    // only ones it honours, and any other is refused rather than silently ignored.
    std::optional<Index> steps;
    if (!o.resume.empty()) {
      for (const CLI::Option* option : app.get_options()) {
        const std::string name = option->get_name();
        if (option->count() > 0 && name != "--resume" && name != "--steps" && name != "--threads")
          gqe::fail<gqe::InputError>(name, " cannot change a resumed run, which keeps its saved settings; with --resume, "
                                     "expected only --steps (the new total) and --threads");
      }
      if (app.count("--steps") > 0) steps = o.steps;
    }
    if (o.threads > 0) gqe::set_num_threads(o.threads);
    std::signal(SIGINT, on_sigint);
    if (o.throughput) return measure_throughput(o);
    return run_comparison(o, steps);
  });
}
