// Minimal check harness shared by the C++ unit tests: CHECK counts failures and goes on,
// finish() reports them and gives main's exit status.
#pragma once

#include <cstdio>

static int failures = 0;

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                                    \
    }                                                                                \
  } while (0)

static int finish(const char* name) {
  if (failures) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures);
    return 1;
  }
  std::printf("%s: all checks passed\n", name);
  return 0;
}
