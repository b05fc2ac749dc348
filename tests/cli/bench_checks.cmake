# Shared by the gqe-bench checks (included by check_bench_model.cmake and check_layer_speedup.cmake).

# gqe-bench with `args` (a list) exits 2 with one line on stderr, "gqe-bench: error: ...", holding
# the optional third argument, and nothing on stdout.
function(expect_bench_usage_error bench args)
  execute_process(COMMAND "${bench}" ${args} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
  string(STRIP "${err}" err)
  string(FIND "${err}" "\n" newline)
  set(says "${ARGV2}")
  string(FIND "${err}" "${says}" found)
  if(status EQUAL 2 AND err MATCHES "^gqe-bench: error: " AND newline EQUAL -1 AND found GREATER -1 AND out STREQUAL "")
    message(STATUS "ok   ${args}: exit 2, one line: ${err}")
  else()
    message(SEND_ERROR "FAIL ${args}: exit ${status}, expected 2 and a line with \"${says}\"; stderr:\n${err}\nstdout:\n${out}")
  endif()
endfunction()
