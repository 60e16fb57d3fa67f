// The syscall wrapper is header-only; this file keeps the module's shape (header + source).
#include "sys/syscall_result.h"
