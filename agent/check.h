// `lazymem-agent check`: what the running kernel offers lazymem, as a table or JSON.
#pragma once

#include <string>

#include "lazymem/kernel_features.h"

namespace lazymem::agent {

std::string format_check_table(const KernelFeatures& kf);
std::string format_check_json(const KernelFeatures& kf);

// 0 when lazy restore can work here; 1 (with kf.uffd_error printed) when userfaultfd cannot be used.
int check_exit_code(const KernelFeatures& kf);

}  // namespace lazymem::agent
