#pragma once
// What the example programs share: CLI11 error mapping (one line on stderr, exit status 2),
// prompt parsing, and the logits file of gqe-run.
#include <CLI/CLI.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

#include "gqe/gqe.hpp"

namespace gqe::cli {

// Exit status for every input or condition the user can fix.
constexpr int kUsageError = 2;

// Output that went wrong after the fact: a full disk or a closed pipe behind stdout shows only when
// the buffered bytes are flushed. IoError naming the error, unless everything was written.
// `earlier` is the errno of writes that may have failed before (std::endl flushes by itself), the
// reason to give when this flush finds the stream failed already.
inline void check_stdout(int earlier = 0) {
  errno = 0;
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    const int error = errno ? errno : earlier;
    std::clearerr(stdout);
    fail<IoError>("cannot write to standard output: ", error ? std::strerror(error) : "write error");
  }
}

// A closed pipe behind stdout (SIGPIPE) or a file size limit (SIGXFSZ) would kill the process
// silently; ignored, the write fails with EPIPE or EFBIG instead, and the error is reported (and a
// temporary file removed) like any other write error.
inline void ignore_output_signals() {
#ifdef SIGPIPE
  std::signal(SIGPIPE, SIG_IGN);
#endif
#ifdef SIGXFSZ
  std::signal(SIGXFSZ, SIG_IGN);
#endif
}

// After a failed parse: "--model: given 2 times; expected once" for the first option of one value
// that was given more than once (CLI11 words it "At Most 1 required but received 2"), else nothing.
inline std::optional<std::string> repeated_option(const CLI::App& app) {
  for (const CLI::Option* option : app.get_options()) {
    if (option->get_items_expected_max() == 1 && option->count() > 1 &&
        option->get_multi_option_policy() == CLI::MultiOptionPolicy::Throw) {
      return option->get_name() + ": given " + std::to_string(option->count()) +
             " times; expected once";
    }
  }
  return std::nullopt;
}

// Runs body() after parsing; maps every failure to one line on stderr (control characters escaped).
// --help and --version exit 0. Standard output is checked before a success is reported.
template <class Body>
int run_main(CLI::App& app, int argc, char** argv, Body&& body) {
  ignore_output_signals();
  const std::string program = app.get_name().empty() ? "gqe" : app.get_name();
  const auto say = [&](const char* kind, const std::string& message) {
    std::fprintf(stderr, "%s: %s: %s\n", program.c_str(), kind, gqe::detail::one_line(message).c_str());
  };
  // --help and --version: CLI11 prints the answer to std::cout.
  const auto answer = [&](const CLI::Error& e) {
    errno = 0;
    const int status = app.exit(e);
    check_stdout(errno);
    return status;
  };
  try {
    try {
      app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
      return answer(e);
    } catch (const CLI::CallForAllHelp& e) {
      return answer(e);
    } catch (const CLI::CallForVersion& e) {
      return answer(e);
    } catch (const CLI::ParseError& e) {
      say("error", repeated_option(app).value_or(e.what()) + " (see --help)");
      return kUsageError;
    }
    const int status = body();
    check_stdout();
    return status;
  } catch (const gqe::Error& e) {
    say("error", e.what());
    return kUsageError;
  } catch (const std::bad_alloc&) {
    say("error", "out of memory; expected a model and prompt that fit in memory");
    return kUsageError;
  } catch (const std::exception& e) {
    say("internal error", e.what());
    return 1;
  }
}

// Reads `text` as an integer in [lo, hi] written in decimal digits alone: "010" is 10; a sign, a
// prefix, a space or a value out of range is refused. Returns what is wrong with it ("" when
// nothing is, and then `value` holds it).
inline std::string read_integer(const std::string& text, std::uint64_t lo, std::uint64_t hi, std::uint64_t& value) {
  const std::string expected = "; expected a decimal integer from " + std::to_string(lo) + " to " + std::to_string(hi);
  if (text.empty() || text.find_first_not_of("0123456789") != std::string::npos)
    return "value \"" + gqe::detail::printable(text, 40) + "\" is not a decimal integer" + expected;
  std::uint64_t v = 0;
  bool over = false;
  for (const char c : text) {
    const auto digit = static_cast<std::uint64_t>(c - '0');
    over = over || v > (UINT64_MAX - digit) / 10;
    if (!over) v = v * 10 + digit;
  }
  if (over || v < lo || v > hi) return "value " + gqe::detail::printable(text, 40) + " is out of range" + expected;
  value = v;
  return "";
}

// An integer option in [lo, hi], read by read_integer. CLI11 by itself reads a leading zero as
// octal ("010" is 8) and "0x10" as hex, and clamps what overflows. Passes the value on without its
// leading zeros.
template <class T>
CLI::Validator integer_in(T lo, T hi) {
  static_assert(std::is_integral_v<T>, "integer_in is for integer options");
  if constexpr (std::is_signed_v<T>) {
    if (lo < 0) throw std::logic_error("integer_in: expected lo >= 0");
  }
  if (hi < lo) throw std::logic_error("integer_in: expected lo <= hi");
  const auto low = static_cast<std::uint64_t>(lo), high = static_cast<std::uint64_t>(hi);
  return CLI::Validator(
      [low, high](std::string& value) -> std::string {
        std::uint64_t v = 0;
        std::string problem = read_integer(value, low, high, v);
        if (problem.empty()) value = std::to_string(v);
        return problem;
      },
      "INT in [" + std::to_string(low) + " - " + std::to_string(high) + "]");
}

// The shortest decimal that reads back as x ("0.1", "1e-12", "1.0000001"), for messages and for
// handing a checked value on.
inline std::string shortest_decimal(double x) {
  char text[32];
  const auto [end, error] = std::to_chars(text, text + sizeof text, x);
  return error == std::errc() ? std::string(text, end) : std::to_string(x);
}

// Reads `text` as a plain decimal number: an optional sign, digits with an optional fraction (at
// least one digit in all: "2", "0.5", ".5"), an optional exponent ("5e-3"); no spaces, hex, inf or
// nan. A value too large for a double, or a nonzero one that would round to 0 (1e-400), is refused
// rather than read as inf or 0. Returns what is wrong with it ("" when nothing is, and then `value`
// holds it).
inline std::string read_decimal(const std::string& text, double& value) {
  std::size_t at = 0;
  const auto skip_sign = [&] { at += at < text.size() && (text[at] == '+' || text[at] == '-'); };
  const auto digits = [&] {
    const std::size_t from = at;
    while (at < text.size() && text[at] >= '0' && text[at] <= '9') ++at;
    return at - from;
  };
  skip_sign();
  std::size_t mantissa_digits = digits();
  if (at < text.size() && text[at] == '.') {
    ++at;
    mantissa_digits += digits();
  }
  const std::size_t mantissa_end = at;
  bool well_formed = mantissa_digits > 0;
  if (well_formed && at < text.size() && (text[at] == 'e' || text[at] == 'E')) {
    ++at;
    skip_sign();
    well_formed = digits() > 0;
  }
  if (!well_formed || at != text.size())
    return "value \"" + gqe::detail::printable(text, 40) + "\" is not a decimal number like 0.5 or 5e-3";
  value = std::strtod(text.c_str(), nullptr);  // the "C" locale: these programs never set another
  if (std::isinf(value)) return "value " + text + " is too large for a double";
  if (value == 0 && text.find_first_of("123456789") < mantissa_end)
    return "value " + text + " is too small for a double, which would hold it as 0";
  return "";
}

// A decimal option in [lo, hi] (or (lo, hi] with above_lo), read by read_decimal; hi may be
// infinity. CLI11 by itself takes "" as 0, " 0.5", "0x1p-1" as 0.5 and 1e-400 as 0. A value out of
// range is echoed as given, so that 1.0000001 is not shown as 1 beside a bound of 1.
inline CLI::Validator decimal_in(double lo, double hi, bool above_lo = false) {
  std::string expected = "; expected a decimal number " + std::string(above_lo ? "> " : ">= ") + shortest_decimal(lo);
  if (!std::isinf(hi)) expected += " and <= " + shortest_decimal(hi);
  return CLI::Validator(
      [lo, hi, above_lo, expected](std::string& value) -> std::string {
        double v = 0;
        if (std::string problem = read_decimal(value, v); !problem.empty()) return problem + expected;
        if (v < lo || (above_lo && v == lo) || v > hi) return "value " + value + " is out of range" + expected;
        value = shortest_decimal(v);
        return "";
      },
      "DECIMAL");
}

// Byte-level tokens: each byte of the text is a token id 0..255.
inline std::vector<std::int32_t> bytes_to_ids(const std::string& text) {
  std::vector<std::int32_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

// "1,2,3" -> {1, 2, 3}. Every entry read as the integer flags are (read_integer), up to the int32
// maximum; the model's vocab_size is checked once it is loaded.
inline std::vector<std::int32_t> parse_ids(const std::string& text) {
  std::vector<std::int32_t> ids;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t comma = std::min(text.find(',', pos), text.size());
    std::uint64_t value = 0;
    if (const std::string problem = read_integer(text.substr(pos, comma - pos), 0, INT32_MAX, value); !problem.empty())
      fail<InputError>("--prompt-ids entry ", ids.size(), ": ", problem, " (ids comma-separated, like 1,2,3)");
    ids.push_back(static_cast<std::int32_t>(value));
    pos = comma + 1;
  }
  return ids;
}

// Refuses, before any work, an output path that cannot be written: an empty one, a folder, or a
// file in a folder that is missing, is not a folder or does not let this process create a file
// there. The folder is probed with a file created and removed at once, so that whatever decides
// (permissions, a read-only file system, /proc) is asked; a device or FIFO at the path, written
// through rather than replaced, must be writable itself.
inline void require_writable_output(const std::string& flag, const std::string& path_given) {
  namespace fs = std::filesystem;
  if (path_given.empty()) fail<InputError>(flag, " is an empty path; expected a file path");
  const std::string cannot = flag + " " + path_given + " cannot be written: ";
  std::error_code ec;
  if (fs::is_directory(path_given, ec)) fail<InputError>(flag, " ", path_given, " is a folder; expected a file path");
  if (detail::is_stream_target(path_given)) {
    if (::access(path_given.c_str(), W_OK) != 0) fail<InputError>(cannot, std::strerror(errno));
    return;
  }
  // The folder write_file_atomically puts its temporary file in: beside the file a link names.
  const fs::path path = detail::replaced_file(path_given), folder = detail::folder_of(path);
  struct stat st {};
  if (::stat(folder.c_str(), &st) != 0)
    fail<InputError>(cannot, "folder ", folder.string(), ": ", std::strerror(errno), "; expected a file in an existing folder");
  if (!S_ISDIR(st.st_mode))
    fail<InputError>(cannot, folder.string(), " is a file, not a folder; expected a file in an existing folder");
  const fs::path probe = folder / detail::temporary_name(path.filename().string(), detail::name_limit(folder));
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0)
    fail<InputError>(cannot, "cannot create a file in folder ", folder.string(), ": ", std::strerror(errno),
                     "; expected a file in a folder this process may write");
  ::close(fd);
  ::unlink(probe.c_str());
}

// Refuses an output path at which an input of the same run already stands: the same file by device
// and inode, whatever name leads to it (a link, "dir/../dir/file"), so that a run never destroys
// what it reads. Nothing at the path yet is fine.
inline void refuse_overwriting_inputs(const std::string& flag, const std::filesystem::path& out,
                                      const std::vector<std::filesystem::path>& inputs) {
  struct stat target {};
  if (::stat(out.c_str(), &target) != 0) return;
  for (const auto& input : inputs) {
    struct stat in {};
    if (::stat(input.c_str(), &in) == 0 && in.st_dev == target.st_dev && in.st_ino == target.st_ino)
      fail<InputError>(flag, " ", out.string(), " is ", input.string(),
                       ", an input of this run; expected a path that is not one of the run's inputs");
  }
}

// The files gqe::load_checkpoint reads from a checkpoint folder: config.json, model.safetensors or
// the index and the shards it names. Named rather than listed, so that they are found in a folder
// that cannot be listed (mode 0300) too.
inline std::vector<std::filesystem::path> checkpoint_files(const std::filesystem::path& folder) {
  std::vector<std::filesystem::path> files = {folder / "config.json", folder / detail::kSingleFile,
                                              folder / detail::kIndexFile};
  for (const auto& shard : detail::indexed_shards(folder)) files.push_back(folder / shard);
  return files;
}

// gqe-run's logits file: "logits" F32 [T, V] and, for GQE models, "expert_indices" I32 [L, T, G, k].
template <class Scalar>
void write_logits(const std::string& path, const Tensor<Scalar>& logits, const Tensor<std::int32_t>* experts) {
  const Index T = logits.dim(1), V = logits.dim(2);
  std::vector<EncodedTensor> tensors = {encode_tensor("logits", DType::F32, {T, V}, logits.data())};
  if (experts) {
    const auto dims = experts->shape().dims();
    tensors.push_back(encode_tensor("expert_indices", DType::I32, std::vector<std::int64_t>(dims.begin(), dims.end()),
                                    experts->data()));
  }
  write_safetensors(path, tensors);
}

}  // namespace gqe::cli
