// One named spdlog logger per component ("runtime", "pageserver", "agent", ...).
#pragma once

#include <spdlog/spdlog.h>

#include <memory>

namespace lazymem::log {

// Returns the component's logger, creating it (stderr) on first use.
std::shared_ptr<spdlog::logger> get(const char* component);

// Sets the level of every lazymem logger ("debug", "info", "warn", "error", "off").
void set_level(const std::string& level);

}  // namespace lazymem::log
