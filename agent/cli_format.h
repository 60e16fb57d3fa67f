// Tables for the agent CLI (status, regions, stats) from the daemon's JSON reports.
#pragma once

#include <string>

namespace lazymem::agent {

std::string format_status(const std::string& json);
std::string format_regions(const std::string& json);
std::string format_stats(const std::string& json);

}  // namespace lazymem::agent
