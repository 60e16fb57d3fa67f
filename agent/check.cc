// `lazymem-agent check`: what the running kernel offers lazymem, as a table or JSON.
#include "check.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

namespace lazymem::agent {

std::string format_check_table(const KernelFeatures& kf) {
  auto rows = kf.rows();
  size_t w = 7;
  for (const auto& r : rows) w = std::max(w, r.feature.size());
  std::string out = fmt::format("{:<{}}  {:<7}  {:<45}  {}\n", "feature", w, "present", "needed by", "fallback");
  for (const auto& r : rows) {
    out += fmt::format("{:<{}}  {:<7}  {:<45}  {}\n", r.feature, w, r.present ? "yes" : "NO", r.needed_by,
                       r.present ? "-" : r.fallback);
  }
  if (!kf.uffd_usable) out += "\nuserfaultfd cannot be used: " + kf.uffd_error + "\n";
  if (!kf.io_uring_usable) out += "io_uring: " + kf.io_uring_error + "\n";
  if (!kf.o_direct) out += "O_DIRECT: " + kf.o_direct_error + "\n";
  return out;
}

std::string format_check_json(const KernelFeatures& kf) {
  nlohmann::json j;
  j["usable"] = kf.uffd_usable;
  j["uffd_via"] = kf.uffd_via;
  j["uffd_error"] = kf.uffd_error;
  j["uffd_features"] = fmt::format("{:#x}", kf.uffd_features);
  j["uffd_ioctls"] = fmt::format("{:#x}", kf.uffd_ioctls);
  j["features"] = nlohmann::json::array();
  for (const auto& r : kf.rows()) {
    j["features"].push_back({{"feature", r.feature}, {"present", r.present}, {"needed_by", r.needed_by},
                             {"fallback", r.fallback}});
  }
  return j.dump();
}

int check_exit_code(const KernelFeatures& kf) { return kf.uffd_usable ? 0 : 1; }

}  // namespace lazymem::agent
