// Running a command line from a test: its output (stdout and stderr) and exit status.
#pragma once

#include <sys/wait.h>

#include <cstdio>
#include <string>
#include <utility>

namespace lazymem::testing {

// Runs `cmd` (a shell command line); returns its output and exit status (128: killed by a signal).
inline std::pair<std::string, int> run_cli(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return {"popen failed", 127};
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int st = ::pclose(p);
  return {out, WIFEXITED(st) ? WEXITSTATUS(st) : 128};
}

}  // namespace lazymem::testing
