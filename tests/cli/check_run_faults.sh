#!/usr/bin/env bash
# gqe-run against faults beyond malformed files: threads the system refuses, odd output paths
# (the model's own files, a FIFO, devices, a 250-byte name), full disks, closed pipes and file size
# limits behind stdout and the logits file, a model whose output turns NaN, integer flags with
# leading zeros, paths holding control characters. Each refusal is exit status 2 with one line on
# stderr and no output file; nothing is replaced that should not be.
# Usage: check_run_faults.sh GQE_RUN GOOD_MODEL BYTE_MODEL SHARDED_MODEL SCRATCH [sanitized]
set -u
run=$1 good=$2 bytes=$3 sharded=$4 tmp=$5 sanitized=${6:-}
rm -rf "$tmp" && mkdir -p "$tmp" || exit 1
trap 'rm -rf "$tmp"' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/checks.sh"

# Permissions do not bind root: as root, the cases about them run as the user nobody (setpriv),
# when it may run gqe-run and read the fixtures; else they are skipped ("none").
unprivileged=()
if [[ $(id -u) == 0 ]]; then
  unprivileged=(setpriv --reuid=65534 --regid=65534 --clear-groups)
  if ! "${unprivileged[@]}" "$run" --model "$good" --prompt-ids 1 --generate 1 > /dev/null 2>&1; then unprivileged=(none); fi
fi

# Threads the system refuses: 512 thread stacks do not fit in 400 MB of address space.
if [[ -n $sanitized ]]; then
  echo "skip threads_refused: sanitizers reserve terabytes of address space, so ulimit -v cannot be set"
else
  refused threads_refused "the system refused to start thread" \
    bash -c 'ulimit -v 400000 && exec "$0" --model "$1" --prompt-ids 1 --threads 512' "$run" "$good"
fi

# Integer flags are decimal: a leading zero is not octal.
succeeds generate_010 "$run" --model "$good" --prompt-ids 1 --generate 010
check generate_010_gives_10_tokens test "$(wc -c < "$tmp/stdout")" = 10  # vocabulary <= 256: one byte each
succeeds seed_010 "$run" --model "$good" --prompt-ids 1 --generate 12 --temperature 1 --seed 010
cp "$tmp/stdout" "$tmp/seed_010"
succeeds seed_10 "$run" --model "$good" --prompt-ids 1 --generate 12 --temperature 1 --seed 10
check seed_010_is_seed_10 cmp -s "$tmp/stdout" "$tmp/seed_010"
rm -f "$tmp/seed_010"

# An option of one value given twice is named, with how often it was given; a flag may repeat.
refused generate_twice "--generate: given 2 times; expected once" "$run" --model "$good" --prompt-ids 1 -n 2 --generate 3
refused model_three_times "--model: given 3 times; expected once" \
  "$run" --model "$good" --model "$good" --model "$good" --prompt-ids 1
succeeds print_ids_twice "$run" --model "$good" --prompt-ids 1 --generate 2 --print-ids --print-ids

# Decimal flags are plain decimal numbers, refused with the value as given; --prompt-ids entries
# are read as the integer flags are.
refused temperature_empty 'value "" is not a decimal number' "$run" --model "$good" --prompt-ids 1 --temperature ""
refused top_p_empty 'value "" is not a decimal number' "$run" --model "$good" --prompt-ids 1 --top-p ""
refused top_p_just_above_one "--top-p: value 1.0000001 is out of range; expected a decimal number > 0 and <= 1" \
  "$run" --model "$good" --prompt-ids 1 --top-p 1.0000001
refused temperature_underflow "value 1e-400 is too small" "$run" --model "$good" --prompt-ids 1 --temperature 1e-400
succeeds top_p_point_5 "$run" --model "$good" --prompt-ids 1 --generate 12 --temperature 1 --top-p .5 --seed 3
cp "$tmp/stdout" "$tmp/point_5"
succeeds top_p_0.5e0 "$run" --model "$good" --prompt-ids 1 --generate 12 --temperature 1 --top-p 0.5e0 --seed 3
check top_p_point_5_is_0.5e0 cmp -s "$tmp/stdout" "$tmp/point_5"
rm -f "$tmp/point_5"
succeeds prompt_ids_leading_zeros "$run" --model "$good" --prompt-ids 0000000000001,02 --generate 5
cp "$tmp/stdout" "$tmp/zeros"
succeeds prompt_ids_plain "$run" --model "$good" --prompt-ids 1,2 --generate 5
check prompt_ids_leading_zeros_are_decimal cmp -s "$tmp/stdout" "$tmp/zeros"
rm -f "$tmp/zeros"
refused prompt_ids_far_out_of_range "--prompt-ids entry 1: value 99999999999999999999 is out of range" \
  "$run" --model "$good" --prompt-ids 1,99999999999999999999

# A prompt plus the tokens to generate that do not fit are counted in words that fit them.
refused one_token_too_many "a prompt of 1 token plus 4096 tokens to generate exceeds max_position_embeddings = 4096" \
  "$run" --model "$good" --prompt-ids 1 --generate 4096

# Paths with a newline or an escape sequence: one line on stderr, the characters escaped.
refused model_path_with_newline 'a\x0ab' "$run" --model "$tmp/a"$'\n'"b" --prompt-ids 1
refused model_path_with_escape '\x1b[31m' "$run" --model "$tmp/"$'\e'"[31mred" --prompt-ids 1
refused flag_value_with_newline '\x0a' "$run" --model "$good" --prompt-ids 1 --mode $'pre\nfill'

# Non-regular files are written through, never replaced: a FIFO read by another process, and
# devices made with mknod here (as root; never the machine's own /dev/null).
succeeds logits_to_regular_file "$run" --model "$good" --prompt-ids 1,2,3 --logits-out "$tmp/regular.safetensors"
mkfifo "$tmp/fifo"
# This script holds the FIFO open (read-write, which does not block) until gqe-run is done, so that
# the reader ends whether or not gqe-run wrote into the FIFO.
exec 3<> "$tmp/fifo"
cat "$tmp/fifo" > "$tmp/from_fifo" 3>&- &
reader=$!
succeeds logits_to_fifo "$run" --model "$good" --prompt-ids 1,2,3 --logits-out "$tmp/fifo"
exec 3>&-
wait "$reader"
check fifo_is_still_a_fifo test -p "$tmp/fifo"
check fifo_got_the_file cmp -s "$tmp/from_fifo" "$tmp/regular.safetensors"
if mknod "$tmp/null" c 1 3 2> /dev/null && mknod "$tmp/full" c 1 7 2> /dev/null; then
  succeeds logits_to_null_device "$run" --model "$good" --prompt-ids 1,2,3 --logits-out "$tmp/null"
  check null_device_is_still_a_device test -c "$tmp/null"
  refused logits_to_full_device "No space left on device" \
    "$run" --model "$good" --prompt-ids 1,2,3 --logits-out "$tmp/full"
  check full_device_is_still_a_device test -c "$tmp/full"
else
  echo "skip device cases: mknod needs root (CAP_MKNOD)"
fi
rm -f "$tmp/fifo" "$tmp/from_fifo" "$tmp/null" "$tmp/full" "$tmp/regular.safetensors"

# A 250-byte file name: the temporary name beside it stays within the 255-byte limit.
long=$(printf 'L%.0s' $(seq 238)).safetensors
mkdir "$tmp/long"
succeeds logits_out_250_byte_name "$run" --model "$good" --prompt-ids 1,2 --logits-out "$tmp/long/$long"
check long_name_exists test -s "$tmp/long/$long"
check long_name_written_alone test "$(ls -A "$tmp/long" | wc -l)" = 1

# An unwritable --logits-out is refused before the model is loaded or run: nothing generated, the
# reason named. A model folder that does not exist is not reached.
refused logits_out_empty "--logits-out is an empty path" "$run" --model "$good" --prompt-ids 1 --generate 3 --logits-out ""
refused logits_out_missing_folder "No such file or directory" \
  "$run" --model "$good" --prompt-ids 1 --generate 3 --logits-out "$tmp/none/x.safetensors"
check logits_out_missing_folder_generates_nothing test ! -s "$tmp/stdout"
refused logits_out_is_a_folder "is a folder" "$run" --model "$good" --prompt-ids 1 --generate 3 --logits-out "$tmp"
check logits_out_is_a_folder_generates_nothing test ! -s "$tmp/stdout"
refused logits_out_in_a_file "$good/config.json is a file, not a folder" \
  "$run" --model "$good" --prompt-ids 1 --generate 3 --logits-out "$good/config.json/x.safetensors"
refused logits_out_checked_before_the_model "--logits-out $tmp/none/x.safetensors cannot be written" \
  "$run" --model "$tmp/no-model" --prompt-ids 1 --logits-out "$tmp/none/x.safetensors"
if [[ ${unprivileged[0]:-} != none ]]; then
  mkdir "$tmp/read-only" && chmod 555 "$tmp/read-only"
  refused logits_out_in_a_read_only_folder "cannot create a file in folder $tmp/read-only: Permission denied" \
    "${unprivileged[@]}" "$run" --model "$good" --prompt-ids 1 --generate 3 --logits-out "$tmp/read-only/x.safetensors"
  check logits_out_in_a_read_only_folder_generates_nothing test ! -s "$tmp/stdout"
  check read_only_folder_left_empty test -z "$(ls -A "$tmp/read-only")"
  rmdir "$tmp/read-only"
else
  echo "skip read-only folder: running as root, and setpriv cannot run gqe-run as the user nobody"
fi

# --logits-out onto an input of the same run: refused by device and inode, whatever the name.
cp -R "$good" "$tmp/model"
cp "$tmp/model/model.safetensors" "$tmp/original.safetensors"
ln "$tmp/model/model.safetensors" "$tmp/hardlink"
ln -s "model/config.json" "$tmp/symlink"
refused logits_out_is_the_model "an input of this run" \
  "$run" --model "$tmp/model" --prompt-ids 1,2 --logits-out "$tmp/model/model.safetensors"
refused logits_out_is_a_hard_link_to_the_model "an input of this run" \
  "$run" --model "$tmp/model" --prompt-ids 1,2 --logits-out "$tmp/hardlink"
refused logits_out_is_a_link_to_the_config "an input of this run" \
  "$run" --model "$tmp/model" --prompt-ids 1,2 --logits-out "$tmp/symlink"
refused logits_out_is_the_config_by_another_name "an input of this run" \
  "$run" --model "$tmp/model" --prompt-ids 1,2 --logits-out "$tmp/model/../model/config.json"
check model_left_intact cmp -s "$tmp/model/model.safetensors" "$tmp/original.safetensors"
rm -rf "$tmp/model" "$tmp/hardlink" "$tmp/symlink" "$tmp/original.safetensors"
# A sharded checkpoint: its index and every shard are inputs too.
cp -R "$sharded" "$tmp/sharded"
refused logits_out_is_a_shard "an input of this run" \
  "$run" --model "$tmp/sharded" --prompt-ids 1,2 --logits-out "$tmp/sharded/model-00002-of-00003.safetensors"
refused logits_out_is_the_index "an input of this run" \
  "$run" --model "$tmp/sharded" --prompt-ids 1,2 --logits-out "$tmp/sharded/model.safetensors.index.json"
check shards_left_intact diff -r -q "$sharded" "$tmp/sharded"
rm -rf "$tmp/sharded"
# A model folder that can be searched but not listed (mode 0300): its files are inputs all the same.
if [[ ${unprivileged[0]:-} != none ]]; then
  cp -R "$good" "$tmp/unlisted"
  [[ -n ${unprivileged[*]} ]] && chown -R 65534:65534 "$tmp/unlisted"
  chmod 300 "$tmp/unlisted"
  refused logits_out_is_the_model_in_an_unlisted_folder "an input of this run" \
    "${unprivileged[@]}" "$run" --model "$tmp/unlisted" --prompt-ids 1,2 --logits-out "$tmp/unlisted/model.safetensors"
  chmod 700 "$tmp/unlisted"
  check unlisted_model_left_intact cmp -s "$tmp/unlisted/model.safetensors" "$good/model.safetensors"
  rm -rf "$tmp/unlisted"
else
  echo "skip unlisted model folder: running as root, and setpriv cannot run gqe-run as the user nobody"
fi

# Write errors on stdout: a full disk stops the run with exit 2, and leaves no logits file.
if [[ -w /dev/full ]]; then
  refused stdout_full_generate "cannot write to standard output" \
    bash -c 'exec "$0" --model "$1" --prompt-ids 1 --generate 50 --logits-out "$2/x.safetensors" > /dev/full' \
    "$run" "$good" "$tmp"
  check stdout_full_leaves_no_logits test ! -e "$tmp/x.safetensors"
  printf 'the quick brown fox jumps over the lazy dog\n' > "$tmp/text.txt"
  refused stdout_full_perplexity "cannot write to standard output" \
    bash -c 'exec "$0" --model "$1" --perplexity "$2/text.txt" > /dev/full' "$run" "$bytes" "$tmp"
  refused stdout_full_text_generate "cannot write to standard output" \
    bash -c 'exec "$0" --model "$1" --prompt hi --generate 20 > /dev/full' "$run" "$bytes"
  # A warning would have come first; a run that fails prints its error alone.
  refused stdout_full_after_a_warning "cannot write to standard output" \
    bash -c 'exec "$0" --model "$1" --prompt hi --generate 20 --top-k 3 > /dev/full' "$run" "$bytes"
else
  echo "skip stdout_full: no writable /dev/full"
fi

# A closed pipe behind stdout (`gqe-run ... | head -c 1`) and a file size limit (ulimit -f) are
# write errors like a full disk, never a signal; the temporary logits file is removed.
refused stdout_closed_pipe_generate "cannot write to standard output: Broken pipe" \
  bash -c "$closed_pipe" "$tmp" "$run" --model "$bytes" --prompt hi --generate 50
refused stdout_closed_pipe_version "cannot write to standard output: Broken pipe" \
  bash -c "$closed_pipe" "$tmp" "$run" --version
mkdir "$tmp/limited"
refused logits_out_past_file_size_limit "cannot write $tmp/limited/x.safetensors: File too large" \
  bash -c 'ulimit -f 2 && exec "$0" --model "$1" --prompt "hello world hello world" --logits-out "$2/x.safetensors"' \
  "$run" "$bytes" "$tmp/limited"
check file_size_limit_leaves_no_file test -z "$(ls -A "$tmp/limited")"
# (A limit of 1 KB: stderr, a file here too, must take the message.)
refused stdout_past_file_size_limit "cannot write to standard output: File too large" \
  bash -c 'ulimit -f 1 && exec "$0" --model "$1" --prompt hi --generate 1500 > "$2/out.txt"' "$run" "$bytes" "$tmp/limited"
rm -rf "$tmp/limited"

# All or nothing: a model whose logits are NaN (every weight byte 0xff, a NaN in F32) fails in
# --generate after the logits were computed; no logits file is left, and no statistics printed.
cp -R "$good" "$tmp/nan"
header=$(od -An -tu8 -N8 "$good/model.safetensors" | tr -d ' ')
size=$(stat -c %s "$good/model.safetensors")
{ head -c $((8 + header)) "$good/model.safetensors"; head -c $((size - 8 - header)) /dev/zero | tr '\0' '\377'; } \
  > "$tmp/nan/model.safetensors"
refused nan_during_generate "is NaN" \
  "$run" --model "$tmp/nan" --prompt-ids 1,2 --generate 3 --stats --logits-out "$tmp/x.safetensors"
check nan_leaves_no_logits test ! -e "$tmp/x.safetensors"
refused nan_during_generate_after_a_warning "is NaN" \
  "$run" --model "$tmp/nan" --prompt-ids 1,2 --generate 3 --top-k 3 --logits-out "$tmp/x.safetensors"
rm -rf "$tmp/nan"

echo "$cases checks, $failures failed"
[[ $failures == 0 ]]
