// cli::parse and cli::run: Boost.Program_options with the checks it lacks, and one error line.
#include "cli/options.h"

#include <fmt/format.h>

#include <iostream>
#include <typeinfo>

#include "lazymem/snapshot.h"

namespace lazymem::cli {
namespace {

bool is_unsigned(const std::type_info& t) {
  return t == typeid(unsigned char) || t == typeid(unsigned short) || t == typeid(unsigned) ||
         t == typeid(unsigned long) || t == typeid(unsigned long long);
}

}  // namespace

po::variables_map parse(const std::vector<std::string>& args, po::options_description& desc,
                        const po::positional_options_description* positional) {
  desc.add_options()("help,h", "show this help");
  po::command_line_parser parser(args);
  parser.options(desc);
  if (positional) parser.positional(*positional);
  po::parsed_options parsed = parser.run();
  po::variables_map vm;
  po::store(parsed, vm);
  if (vm.count("help")) {
    std::cout << desc;
    throw HelpShown{};
  }
  for (const auto& o : parsed.options) {
    if (o.position_key >= 0 && o.string_key.empty()) {  // Boost keeps what no option takes, and says nothing
      throw std::invalid_argument(fmt::format("unexpected argument '{}'", o.value.empty() ? "" : o.value.front()));
    }
    if (o.unregistered || !vm.count(o.string_key) || !is_unsigned(vm[o.string_key].value().type())) continue;
    for (const auto& v : o.value) {
      if (v.find('-') != std::string::npos) {
        throw std::invalid_argument(fmt::format("--{} wants a whole number, 0 or more; got '{}'", o.string_key, v));
      }
    }
  }
  po::notify(vm);
  return vm;
}

uint32_t chunk_bytes(const po::variables_map& vm, const char* option) {
  const uint32_t kib = vm[option].as<uint32_t>();
  constexpr uint32_t lo = kMinChunkSize / 1024, hi = kMaxChunkSize / 1024;
  if (kib < lo || kib > hi || (kib & (kib - 1)) != 0) {
    throw std::invalid_argument(fmt::format("--{} wants a power of two from {} to {} (KiB), got {}", option, lo, hi, kib));
  }
  return kib * 1024;
}

int run(const std::string& program, const std::string& command, const std::function<int()>& fn) {
  const std::string who = command.empty() ? program : program + " " + command;
  try {
    return fn();
  } catch (const HelpShown&) {
    return 0;
  } catch (const po::error& e) {
    std::cerr << who << ": " << e.what() << " (see " << who << " --help)\n";
    return 2;
  } catch (const std::invalid_argument& e) {
    std::cerr << who << ": " << e.what() << " (see " << who << " --help)\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << who << ": " << e.what() << "\n";
    return 1;
  }
}

}  // namespace lazymem::cli
