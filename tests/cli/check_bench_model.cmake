cmake_minimum_required(VERSION 3.21)
# gqe-bench --model on a small checkpoint: it exits 0 and prints every line its docs promise (load,
# prefill, decode, decode against the read bandwidth in turn with the probe, peak memory), with as
# many probe blocks as asked-for steps allow; a missing folder or a bad count exits 2 with one line.
# Usage: cmake -DGQE_BENCH=... -DMODEL=<a checkpoint folder> -P check_bench_model.cmake
foreach(var GQE_BENCH MODEL)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_bench_model.cmake needs -D${var}=...")
  endif()
endforeach()
function(expect_match text regex what)
  if(text MATCHES "${regex}")
    message(STATUS "ok   ${what}")
  else()
    message(SEND_ERROR "FAIL ${what}: no match for ${regex} in\n${text}")
  endif()
endfunction()

set(number "[0-9]+(\\.[0-9]+)?")
foreach(steps 8 3)
  execute_process(COMMAND "${GQE_BENCH}" --model "${MODEL}" --prompt-tokens 3 --decode-tokens ${steps} --threads 1
                  RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
  if(NOT status EQUAL 0)
    message(SEND_ERROR "FAIL --decode-tokens ${steps}: exit ${status}\n${err}")
    continue()
  endif()
  expect_match("${out}" "\nload ${number} s \\(mapped, panels 16bit" "--decode-tokens ${steps}: load line")
  expect_match("${out}" "\nprefill of 3 tokens: first ${number} s" "--decode-tokens ${steps}: prefill line")
  expect_match("${out}" "\ndecode: ${number} tokens/s, ${number} MB read per token, ${number} GB/s\n"
               "--decode-tokens ${steps}: decode line")
  set(blocks ${steps})
  if(blocks GREATER 8)
    set(blocks 8)
  endif()
  expect_match("${out}" "\ndecode against the read bandwidth, in turn \\(${blocks} blocks of 1 steps, a probe pass after each; medians\\): ${number} GB/s against ${number} GB/s = [0-9]+% \\(best pass ${number} GB/s: [0-9]+%\\)\n"
               "--decode-tokens ${steps}: ${blocks} blocks against the probe")
  expect_match("${out}" "\ntime to first token \\(load \\+ prefill\\): ${number} s; peak resident memory ${number} MB"
               "--decode-tokens ${steps}: first token and peak memory")
endforeach()

include(${CMAKE_CURRENT_LIST_DIR}/bench_checks.cmake)
foreach(args "--model;${MODEL}/no-such-folder" "--model;${MODEL};--decode-tokens;0" "--model;${MODEL};--prompt=3")
  expect_bench_usage_error("${GQE_BENCH}" "${args}")
endforeach()
# Refused before anything is printed, each saying what was wrong.
expect_bench_usage_error("${GQE_BENCH}" "--model;${MODEL}/no-such-folder" "is not a folder; expected a checkpoint folder")
expect_bench_usage_error("${GQE_BENCH}" "--model;${MODEL};--decode-tokens;4096"  # the model's 4096 positions
                         "--decode-tokens is 4096; expected at most max_position_embeddings - 1 = 4095")
expect_bench_usage_error("${GQE_BENCH}" "--model" "--model needs a value")
expect_bench_usage_error("${GQE_BENCH}" "--model;${MODEL};--dtype" "--dtype needs a value")
expect_bench_usage_error("${GQE_BENCH}" "--model;${MODEL};--model;${MODEL}" "--model is given twice")
expect_bench_usage_error("${GQE_BENCH}" "--model;${MODEL};--threads=1;--threads;2" "--threads is given twice")
expect_bench_usage_error("${GQE_BENCH}" "--model;${MODEL};--layer-speedup" "two modes")
expect_bench_usage_error("${GQE_BENCH}" "--model;${MODEL};--tokens;8" "--tokens is a flag of --layer-speedup")
expect_bench_usage_error("${GQE_BENCH}" "--no-probe;--peak;--benchmark_filter=none" "--peak is a flag of --layer-speedup")
