# Shared by the gqe-bench checks (included by check_bench_model.cmake and check_layer_speedup.cmake).

# gqe-bench with `args` (a list) exits 2 with one line on stderr, "gqe-bench: error: ...".
function(expect_bench_usage_error bench args)
  execute_process(COMMAND "${bench}" ${args} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
  string(STRIP "${err}" err)
  string(FIND "${err}" "\n" newline)
  if(status EQUAL 2 AND err MATCHES "^gqe-bench: error: " AND newline EQUAL -1)
    message(STATUS "ok   ${args}: exit 2, one line")
  else()
    message(SEND_ERROR "FAIL ${args}: exit ${status}, stderr:\n${err}")
  endif()
endfunction()
