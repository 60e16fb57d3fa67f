// One named spdlog logger per component.
#include "core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

namespace lazymem::log {

std::shared_ptr<spdlog::logger> get(const char* component) {
  auto existing = spdlog::get(component);
  if (existing) return existing;
  try {
    auto logger = spdlog::stderr_color_mt(component);
    logger->set_level(spdlog::get_level());
    return logger;
  } catch (const spdlog::spdlog_ex&) {
    return spdlog::get(component);  // another thread created it first
  }
}

void set_level(const std::string& level) { spdlog::set_level(spdlog::level::from_str(level)); }

}  // namespace lazymem::log
