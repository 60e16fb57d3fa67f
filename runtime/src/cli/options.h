// Command-line parsing shared by the programs (lazymem-pageserver, lazymem-agent, the benches, the
// example): one way to show a command's help, to refuse a bad flag and to say so.
// Not part of liblazymem: only the programs link it (with Boost.Program_options).
#pragma once

#include <boost/program_options.hpp>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lazymem::cli {

namespace po = boost::program_options;

// Thrown by parse() once it has printed a command's help: the command is done (exit status 0).
struct HelpShown {};

// Parses `args` (without the program and command names) against `desc`, to which it adds
// -h/--help; help is shown even when required options are missing. Beyond Boost's checks, a
// negative number for an unsigned option is refused (Boost takes "-5" as 4294967291).
po::variables_map parse(const std::vector<std::string>& args, po::options_description& desc,
                        const po::positional_options_description* positional = nullptr);

// The chunk size a --chunk-kib style option (`option`, in KiB) asks for, in bytes; refuses what
// a snapshot cannot have, in the option's own unit, before any work is done.
uint32_t chunk_bytes(const po::variables_map& vm, const char* option);

// Runs one command of `program`, and turns what it throws into one line on stderr and an exit
// status: 0 after its help, 2 for a wrong flag or argument (std::invalid_argument, Boost's
// errors: with a pointer to the command's help), 1 for a failure (any other exception).
int run(const std::string& program, const std::string& command, const std::function<int()>& fn);

}  // namespace lazymem::cli
