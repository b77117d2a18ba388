// kvtile_bench: measure one configuration of kvtile on the shapes you give, against the peers
// available on this machine, or A/B two builds of kvtile on the same shapes.
//
//   kvtile_bench --kernel prefill --device cpu --dtype fp32 --head-dim 64 --tile 64x64 \
//                --mask causal --shape 1x512 --heads 8/8
//   kvtile_bench --kernel decode --device cuda --shape 1x4096,16x4096 --heads 32/8 --page 16
//   kvtile_bench --ab ../main-build/bench/kvtile_bench --kernel append --device cuda --shape 1x4096
//   kvtile_bench --list
//
// Google Benchmark runs each shape (CPU: host clock; GPU: CUDA events, manual time); any
// --benchmark_* flag passes through (--benchmark_out=f.json writes the results-protocol file
// bench/collect.py reads). bench/README.md documents every option.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "kvtile/bench/registry.hpp"
#include "kvtile/bench/utest.hpp"
#include "kvtile/core/version.hpp"

#ifndef KVTILE_BENCH_PEERS_DIR
#define KVTILE_BENCH_PEERS_DIR "bench/peers"
#endif

namespace {

using namespace kvtile;
using namespace kvtile::bench;

const char* usage_text = R"(usage: kvtile_bench [options] [--benchmark_* flags]
  --kernel prefill|decode|append   what to run (default prefill)
  --device cpu|cuda                where (default cuda when compiled in, else cpu)
  --dtype fp32|fp16|bf16           element type (default bf16)
  --head-dim D                     head dim (default 128)
  --mask none|causal               mask (default causal)
  --tile BQxBKV                    tile (default: the configuration's default tile)
  --warps W --stages S             CUDA prefill tile warps / pipeline stages (default: any)
  --shape BxL[,BxL...]             batch x length; L is the sequence length (prefill), the key
                                   length (decode) or the cached prefix (append). Default 1x2048
  --heads HQ/HKV                   query / KV heads, GQA when HKV < HQ (default 32/8)
  --q-len N                        decode: query tokens per request, 1..8 (default 1);
                                   append: the chunk (default 512)
  --page P                         page size of paged K/V (default 16)
  --layout nhd|hnd                 paged K/V layout (default nhd)
  --peers auto|none                run bench/peers/*.py on the same shapes (default auto:
                                   when python3 with torch is found)
  --reps N                         repetitions per shape (default 1; medians are reported)
  --ab OTHER_BINARY                A/B: run this build (A) and OTHER (B) alternately on the same
                                   shapes, --ab-rounds times (default 5) x --reps (default 3), and
                                   report medians, B / A and a Mann-Whitney U test
  --results FILE                   also write the rows (kvtile and peers) as JSON lines in the
                                   results protocol: bench/plot.py FILE draws them, collect.py
                                   merges them into a card's results file
  --list                           print the configurations compiled in
  --machine                        one tab-separated line per run (for --ab)
)";

struct options {
  config want;
  bool tile_given = false;
  std::vector<std::pair<int, int>> shapes{{1, 2048}};
  int hq = 32, hkv = 8, q_len = 0, page = 16;
  kv_layout layout = kv_layout::nhd;
  std::string peers = "auto";
  int reps = 0;
  std::string ab, results;
  int ab_rounds = 5;
  bool list = false, machine = false;
  std::vector<std::string> passthrough;  // --benchmark_* flags
  std::vector<std::string> forwarded;    // the options as given, for the A/B children
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "kvtile_bench: %s\n\n%s", msg.c_str(), usage_text);
  std::exit(2);
}

int to_int(const std::string& flag, const std::string& s) {
  char* end = nullptr;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0') usage_error(flag + " takes an integer, got '" + s + "'");
  return int(v);
}

std::pair<int, int> pair_of(const std::string& flag, const std::string& s, char sep) {
  const auto at = s.find(sep);
  if (at == std::string::npos) usage_error(flag + " takes A" + sep + "B, got '" + s + "'");
  return {to_int(flag, s.substr(0, at)), to_int(flag, s.substr(at + 1))};
}

options parse(int argc, char** argv) {
  options o;
  o.want.device = device_kind::cpu;
  for (const entry& e : registry::global().entries())
    if (e.cfg.device == device_kind::cuda) o.want.device = device_kind::cuda;
  o.want.dtype = "bf16";
  o.want.head_dim = 128;
  o.want.mask = "causal";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--benchmark_", 0) == 0) {
      o.passthrough.push_back(a);
      o.forwarded.push_back(a);
      continue;
    }
    if (a == "--list") { o.list = true; continue; }
    if (a == "--machine") { o.machine = true; continue; }
    if (a == "-h" || a == "--help") {
      std::fputs(usage_text, stdout);
      std::exit(0);
    }
    if (i + 1 >= argc) usage_error("unknown option or missing value: " + a);
    const std::string v = argv[++i];
    if (a != "--ab" && a != "--ab-rounds" && a != "--reps" && a != "--results") o.forwarded.insert(o.forwarded.end(), {a, v});
    if (a == "--kernel") {
      if (v == "prefill") o.want.kernel = kernel_kind::prefill;
      else if (v == "decode") o.want.kernel = kernel_kind::decode;
      else if (v == "append") o.want.kernel = kernel_kind::append;
      else usage_error("--kernel takes prefill, decode or append, got '" + v + "'");
    } else if (a == "--device") {
      if (v == "cpu") o.want.device = device_kind::cpu;
      else if (v == "cuda") o.want.device = device_kind::cuda;
      else usage_error("--device takes cpu or cuda, got '" + v + "'");
    } else if (a == "--dtype") {
      if (v != "fp32" && v != "fp16" && v != "bf16") usage_error("--dtype takes fp32, fp16 or bf16, got '" + v + "'");
      o.want.dtype = v;
    } else if (a == "--head-dim") {
      o.want.head_dim = to_int(a, v);
    } else if (a == "--mask") {
      if (v != "none" && v != "causal") usage_error("--mask takes none or causal, got '" + v + "'");
      o.want.mask = v;
    } else if (a == "--tile") {
      std::tie(o.want.block_q, o.want.block_kv) = pair_of(a, v, 'x');
      o.tile_given = true;
    } else if (a == "--warps") {
      o.want.warps = to_int(a, v);
    } else if (a == "--stages") {
      o.want.stages = to_int(a, v);
    } else if (a == "--shape") {
      o.shapes.clear();
      std::stringstream ss(v);
      for (std::string item; std::getline(ss, item, ',');) o.shapes.push_back(pair_of(a, item, 'x'));
    } else if (a == "--heads") {
      std::tie(o.hq, o.hkv) = pair_of(a, v, '/');
    } else if (a == "--q-len") {
      o.q_len = to_int(a, v);
    } else if (a == "--page") {
      o.page = to_int(a, v);
    } else if (a == "--layout") {
      if (v != "nhd" && v != "hnd") usage_error("--layout takes nhd or hnd, got '" + v + "'");
      o.layout = v == "nhd" ? kv_layout::nhd : kv_layout::hnd;
    } else if (a == "--peers") {
      if (v != "auto" && v != "none") usage_error("--peers takes auto or none, got '" + v + "'");
      o.peers = v;
    } else if (a == "--reps") {
      o.reps = to_int(a, v);
    } else if (a == "--ab") {
      o.ab = v;
    } else if (a == "--results") {
      o.results = v;
    } else if (a == "--ab-rounds") {
      o.ab_rounds = to_int(a, v);
    } else {
      usage_error("unknown option " + a);
    }
  }
  return o;
}

bool matches(const config& c, const options& o) {
  const config& w = o.want;
  if (c.kernel != w.kernel || c.device != w.device || c.dtype != w.dtype || c.head_dim != w.head_dim ||
      c.mask != w.mask)
    return false;
  if (o.tile_given && (c.block_q != w.block_q || c.block_kv != w.block_kv)) return false;
  if (w.warps && c.warps != w.warps) return false;
  if (w.stages && c.stages != w.stages) return false;
  return true;
}

// The registered configuration the options name; none is an error listing what is compiled in.
const entry& select(const options& o) {
  const entry* pick = nullptr;
  for (const entry& e : registry::global().entries())
    if (matches(e.cfg, o) && (!pick || (e.cfg.default_tile && !pick->cfg.default_tile))) pick = &e;
  if (pick) return *pick;
  std::string want = std::string(to_string(o.want.kernel)) + " " + to_string(o.want.device) + " " + o.want.dtype +
                     " D" + std::to_string(o.want.head_dim) + " " + o.want.mask;
  if (o.tile_given) want += " " + std::to_string(o.want.block_q) + "x" + std::to_string(o.want.block_kv);
  if (o.want.warps) want += " w" + std::to_string(o.want.warps);
  if (o.want.stages) want += " s" + std::to_string(o.want.stages);
  std::string list;
  for (const entry& e : registry::global().entries())
    if (e.cfg.kernel == o.want.kernel) list += "  " + e.cfg.name() + "\n";
  KVTILE_FAIL(kvtile::errc::unsupported, "the configuration '", want, "' is not compiled into this kvtile_bench; ",
              "compiled in for ", to_string(o.want.kernel), ":\n", list.empty() ? "  (none)\n" : list,
              "register your own instantiation in a few lines: bench/README.md, \"Your own configuration\"");
}

std::vector<problem> problems_of(const options& o, const config& c) {
  std::vector<problem> out;
  for (auto [b, l] : o.shapes) {
    problem p;
    p.kernel = c.kernel;
    p.batch = b;
    p.kv_len = l;
    p.q_len = c.kernel == kernel_kind::prefill ? 0 : o.q_len ? o.q_len : c.kernel == kernel_kind::decode ? 1 : 512;
    p.qo_heads = o.hq;
    p.kv_heads = o.hkv;
    p.head_dim = c.head_dim;
    p.page_size = o.page;
    p.causal = c.mask == "causal";
    p.layout = o.layout;
    p.elem_bytes = c.dtype == "fp32" ? 4 : 2;
    p.check();
    out.push_back(p);
  }
  return out;
}

// ---- Running kvtile: Google Benchmark with a reporter that prints progress as runs finish. ----

struct sample {
  double seconds, value;
};
struct measured {
  std::vector<sample> runs;
  std::string kernel, error;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

class progress_reporter : public benchmark::BenchmarkReporter {
 public:
  progress_reporter(std::map<std::string, measured>& out, const std::vector<std::string>& labels, std::string unit,
                    bool machine)
      : out_(out), labels_(labels), unit_(std::move(unit)), machine_(machine) {}
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.run_type != Run::RT_Iteration) continue;
      const std::string name = r.run_name.function_name;
      const std::string shape = name.substr(name.find('/') + 1);
      measured& m = out_[shape];
      const std::size_t k = m.runs.size() + 1;
      if (r.error_occurred) {
        m.error = r.error_message;
        std::fprintf(stderr, "  %s: error: %s\n", shape.c_str(), r.error_message.c_str());
        continue;
      }
      const auto get = [&](const char* c) { return r.counters.count(c) ? double(r.counters.at(c)) : 0.0; };
      const sample s{get("seconds"), get("value")};
      m.runs.push_back(s);
      const std::string label = r.report_label;
      m.kernel = label.substr(label.find("kernel=") == std::string::npos ? label.size() : label.find("kernel=") + 7);
      if (machine_)
        std::printf("@run\t%s\t%.9g\t%.9g\t%s\t%s\n", shape.c_str(), s.seconds, s.value, unit_.c_str(), m.kernel.c_str());
      else
        std::fprintf(stderr, "  [%zu/%zu] %-44s run %zu: %9.4f ms  %9.3f %s  (%s)\n", index_of(shape) + 1, labels_.size(),
                     shape.c_str(), k, s.seconds * 1e3, s.value, unit_.c_str(), m.kernel.c_str());
      std::fflush(stdout);
    }
  }
  void Finalize() override {}

 private:
  std::size_t index_of(const std::string& s) const {
    return std::size_t(std::find(labels_.begin(), labels_.end(), s) - labels_.begin());
  }
  std::map<std::string, measured>& out_;
  const std::vector<std::string>& labels_;
  std::string unit_;
  bool machine_;
};

std::map<std::string, measured> run_kvtile(const options& o, const entry& e, const std::vector<problem>& ps,
                                           std::vector<std::string>& labels, char* argv0) {
  const std::string unit = unit_of(ps.front(), e.cfg.device);
  for (const problem& p : ps) {
    const std::string label = p.label(e.cfg.dtype);
    labels.push_back(label);
    auto* b = benchmark::RegisterBenchmark(("kvtile/" + label).c_str(), [&e, p, label, unit, cfg = e.cfg](benchmark::State& st) {
      kernel_note().clear();
      try {
        e.run(st, p);
      } catch (const std::exception& ex) {
        st.SkipWithError(ex.what());
        return;
      }
      st.SetLabel("suite=" + std::string(to_string(cfg.kernel)) + ";shape=" + label + ";impl=kvtile;unit=" + unit +
                  ";config=" + cfg.name() + ";kernel=" + kernel_note());
    });
    if (e.cfg.device == device_kind::cuda) b->UseManualTime();
    else b->UseRealTime();
    b->Unit(benchmark::kMillisecond);
  }
  // Google Benchmark reads its own flags; ours were taken out already.
  std::vector<std::string> args{argv0};
  bool min_time = false;
  for (const auto& a : o.passthrough) {
    args.push_back(a);
    min_time |= a.rfind("--benchmark_min_time", 0) == 0;
  }
  if (!min_time) args.push_back("--benchmark_min_time=0.2");
  if (o.reps > 1) args.push_back("--benchmark_repetitions=" + std::to_string(o.reps));
  std::vector<char*> cargs;
  for (auto& a : args) cargs.push_back(a.data());
  int n = int(cargs.size());
  benchmark::Initialize(&n, cargs.data());
  std::map<std::string, measured> out;
  progress_reporter rep(out, labels, unit, o.machine);
  benchmark::RunSpecifiedBenchmarks(&rep);
  benchmark::Shutdown();
  return out;
}

// ---- Peers: bench/peers/*.py on the same shape, one JSON object per line. ----

struct peer_row {
  std::string impl, unit, skip;
  double value = 0;
};

std::string json_field(const std::string& line, const std::string& key) {
  const std::string k = "\"" + key + "\"";
  auto at = line.find(k);
  if (at == std::string::npos) return "";
  at = line.find(':', at + k.size());
  if (at == std::string::npos) return "";
  ++at;
  while (at < line.size() && line[at] == ' ') ++at;
  if (at < line.size() && line[at] == '"') {
    const auto end = line.find('"', at + 1);
    return line.substr(at + 1, end - at - 1);
  }
  const auto end = line.find_first_of(",}", at);
  return line.substr(at, end - at);
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string capture(const std::string& cmd, int* rc = nullptr) {
  std::string out;
  FILE* f = popen(cmd.c_str(), "r");
  if (!f) return out;
  std::array<char, 4096> buf;
  while (std::fgets(buf.data(), int(buf.size()), f)) out += buf.data();
  const int status = pclose(f);
  if (rc) *rc = status;
  return out;
}

// KVTILE_PEERS_DIR, else the source tree this binary was built from, else ./bench/peers (a
// binary copied to another machine and run from a checkout there).
std::string peers_dir() {
  if (const char* d = std::getenv("KVTILE_PEERS_DIR")) return d;
  if (access(KVTILE_BENCH_PEERS_DIR, R_OK) == 0) return KVTILE_BENCH_PEERS_DIR;
  return "bench/peers";
}

std::vector<std::string> peer_scripts(const config& c) {
  std::vector<std::string> s{to_string(c.kernel)};
  if (c.device == device_kind::cuda) s.push_back("flashinfer");
  return s;
}

std::vector<peer_row> run_peers(const config& c, const problem& p) {
  std::vector<peer_row> rows;
  for (const std::string& script : peer_scripts(c)) {
    const std::string path = peers_dir() + "/" + script + ".py";
    if (access(path.c_str(), R_OK) != 0) continue;
    std::ostringstream cmd;
    cmd << "python3 " << shell_quote(path) << " --kernel " << to_string(c.kernel) << " --device " << to_string(c.device)
        << " --dtype " << c.dtype << " --batch " << p.batch << " --len " << p.kv_len << " --q-len " << p.q_len
        << " --hq " << p.qo_heads << " --hkv " << p.kv_heads << " --d " << p.head_dim << " --page " << p.page_size
        << " --causal " << (p.causal ? 1 : 0) << " --layout " << (p.layout == kv_layout::nhd ? "nhd" : "hnd")
        << " --shape-label " << shell_quote(p.label(c.dtype)) << " 2>&1";
    std::fprintf(stderr, "  peer %s on %s ...\n", script.c_str(), p.label(c.dtype).c_str());
    const std::string out = capture(cmd.str());
    std::stringstream ss(out);
    for (std::string line; std::getline(ss, line);) {
      if (line.rfind("{", 0) != 0) {
        if (!line.empty()) std::fprintf(stderr, "    %s\n", line.c_str());
        continue;
      }
      peer_row r;
      r.impl = json_field(line, "impl");
      r.unit = json_field(line, "unit");
      r.skip = json_field(line, "skip");
      const std::string v = json_field(line, "value");
      r.value = v.empty() || v == "null" ? 0 : std::atof(v.c_str());
      std::fprintf(stderr, "    %s: %s\n", r.impl.c_str(),
                   r.skip.empty() ? (std::to_string(r.value) + " " + r.unit).c_str() : ("skipped: " + r.skip).c_str());
      rows.push_back(r);
    }
  }
  return rows;
}

bool python_with_torch() {
  int rc = 0;
  capture("python3 -c 'import torch' >/dev/null 2>&1", &rc);
  return rc == 0;
}

// A peer's value in the row's unit (the peer scripts print T or G rates).
double in_unit(double v, const std::string& from, const std::string& to) {
  if (from == to) return v;
  const bool ft = !from.empty() && from[0] == 'T', tt = !to.empty() && to[0] == 'T';
  return ft && !tt ? v * 1e3 : !ft && tt ? v * 1e-3 : v;
}

void print_table(const config& c, const std::vector<problem>& ps, const std::vector<std::string>& labels,
                 const std::map<std::string, measured>& kv, const std::map<std::string, std::vector<peer_row>>& peers,
                 const std::string& unit) {
  std::printf("\n== kvtile %s: %s ==\n", std::string(version_string).c_str(), c.name().c_str());
  std::printf("%-46s %-34s %10s %10s %9s\n", "shape", "impl (kernel)", "time ms", unit.c_str(), "kvtile/x");
  for (std::size_t i = 0; i < labels.size(); ++i) {
    const auto it = kv.find(labels[i]);
    if (it == kv.end() || it->second.runs.empty()) {
      std::printf("%-46s %-34s %s\n", labels[i].c_str(), "kvtile", it == kv.end() ? "no result" : it->second.error.c_str());
      continue;
    }
    std::vector<double> secs, vals;
    for (const sample& s : it->second.runs) secs.push_back(s.seconds), vals.push_back(s.value);
    const double t = median(secs), v = median(vals);
    std::printf("%-46s %-34s %10.4f %10.3f\n", labels[i].c_str(), ("kvtile (" + it->second.kernel + ")").c_str(), t * 1e3, v);
    const auto pit = peers.find(labels[i]);
    if (pit == peers.end()) continue;
    const double work = ps[i].by_bytes() ? ps[i].bytes() : ps[i].flops();
    const double scale = c.device == device_kind::cuda ? 1e12 : 1e9;
    for (const peer_row& r : pit->second) {
      if (!r.skip.empty() || r.value <= 0) {
        std::printf("%-46s %-34s %s\n", "", r.impl.c_str(), r.skip.empty() ? "no value" : ("skipped: " + r.skip).c_str());
        continue;
      }
      const double pv = in_unit(r.value, r.unit, unit);
      std::printf("%-46s %-34s %10.4f %10.3f %9.2f\n", "", r.impl.c_str(), work / (pv * scale) * 1e3, pv, v / pv);
    }
  }
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// The rows as JSON lines of the results protocol (bench/README.md): kvtile's medians and the
// peers' values in the same unit.
void write_results(const std::string& path, const config& c, const std::vector<std::string>& labels,
                   const std::map<std::string, measured>& kv, const std::map<std::string, std::vector<peer_row>>& peers,
                   const std::string& unit) {
  FILE* f = std::fopen(path.c_str(), "w");
  KVTILE_REQUIRE(f != nullptr, kvtile::errc::invalid_argument, "--results: cannot write '", path, "'");
  const std::string suite = to_string(c.kernel);
  auto line = [&](const std::string& shape, const std::string& impl, double value, const std::string& extra) {
    std::fprintf(f, "{\"suite\": %s, \"shape\": %s, \"impl\": %s, \"unit\": %s, \"value\": %.6g%s}\n",
                 json_string(suite).c_str(), json_string(shape).c_str(), json_string(impl).c_str(),
                 json_string(unit).c_str(), value, extra.c_str());
  };
  for (const auto& label : labels) {
    const auto it = kv.find(label);
    if (it != kv.end() && !it->second.runs.empty()) {
      std::vector<double> vals;
      for (const sample& s : it->second.runs) vals.push_back(s.value);
      line(label, "kvtile", median(vals),
           ", \"config\": " + json_string(c.name()) + ", \"kernel\": " + json_string(it->second.kernel));
    }
    const auto pit = peers.find(label);
    if (pit == peers.end()) continue;
    for (const peer_row& r : pit->second)
      if (r.skip.empty() && r.value > 0) line(label, r.impl, in_unit(r.value, r.unit, unit), "");
  }
  std::fclose(f);
  std::fprintf(stderr, "kvtile_bench: rows written to %s (python3 bench/plot.py %s draws them)\n", path.c_str(),
               path.c_str());
}

// ---- A/B: this binary (A) and another build (B), alternately, on the same shapes. ----

std::string self_path() {
  std::array<char, 4096> buf{};
  const ssize_t n = readlink("/proc/self/exe", buf.data(), buf.size() - 1);
  return n > 0 ? std::string(buf.data(), std::size_t(n)) : "kvtile_bench";
}

int run_ab(const options& o) {
  const std::string a = self_path(), b = o.ab;
  if (access(b.c_str(), X_OK) != 0) usage_error("--ab: '" + b + "' is not an executable");
  const int reps = o.reps > 0 ? o.reps : 3;
  std::string common;
  for (const auto& f : o.forwarded) common += " " + shell_quote(f);
  common += " --peers none --machine --reps " + std::to_string(reps);
  std::map<std::string, std::array<std::vector<double>, 2>> secs;
  std::map<std::string, std::array<std::string, 2>> kernels;
  std::vector<std::string> order;
  for (int round = 0; round < o.ab_rounds; ++round) {
    for (int side = 0; side < 2; ++side) {
      const std::string& bin = side == 0 ? a : b;
      std::fprintf(stderr, "A/B round %d/%d: %s %s\n", round + 1, o.ab_rounds, side == 0 ? "A" : "B", bin.c_str());
      int rc = 0;
      const std::string out = capture(shell_quote(bin) + common + " 2>/dev/null", &rc);
      std::stringstream ss(out);
      int got = 0;
      for (std::string line; std::getline(ss, line);) {
        if (line.rfind("@run\t", 0) != 0) continue;
        std::vector<std::string> f;
        std::stringstream ls(line);
        for (std::string x; std::getline(ls, x, '\t');) f.push_back(x);
        if (f.size() < 6) continue;
        if (!secs.count(f[1])) order.push_back(f[1]);
        secs[f[1]][side].push_back(std::atof(f[2].c_str()));
        kernels[f[1]][side] = f[5];
        ++got;
      }
      if (rc != 0 || got == 0) {
        std::fprintf(stderr, "kvtile_bench: A/B: %s (%s) failed (status %d); its output:\n%s\n", side == 0 ? "A" : "B",
                     bin.c_str(), rc, out.c_str());
        return 1;
      }
    }
  }
  std::printf("\n== A/B: A = %s, B = %s; %d rounds x %d runs each, alternating ==\n", a.c_str(), b.c_str(), o.ab_rounds,
              reps);
  std::printf("%-46s %12s %12s %8s %10s  %s\n", "shape", "A ms", "B ms", "B/A time", "U-test p", "verdict");
  for (const auto& s : order) {
    const auto& v = secs[s];
    const double ma = median(v[0]), mb = median(v[1]);
    const u_test_result u = mann_whitney_u(v[0], v[1]);
    const char* verdict = u.p >= 0.05 ? "no significant difference" : mb < ma ? "B faster (p < 0.05)" : "B slower (p < 0.05)";
    std::printf("%-46s %12.4f %12.4f %8.3f %10.4f  %s\n", s.c_str(), ma * 1e3, mb * 1e3, mb / ma, u.p, verdict);
    if (kernels[s][0] != kernels[s][1])
      std::printf("%-46s kernels differ: A ran %s, B ran %s\n", "", kernels[s][0].c_str(), kernels[s][1].c_str());
  }
  const std::size_t n = std::size_t(o.ab_rounds) * std::size_t(reps);
  std::printf("Mann-Whitney U, two-sided, normal approximation with tie and continuity corrections, %zu samples per side%s\n",
              n, n < 9 ? " (fewer than 9: the p-value is rough; raise --ab-rounds or --reps)" : "");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  if (o.list) {
    std::printf("kvtile %s: configurations compiled into this kvtile_bench\n", std::string(version_string).c_str());
    for (const entry& e : registry::global().entries())
      std::printf("  %s%s\n", e.cfg.name().c_str(), e.cfg.default_tile && e.cfg.block_q ? "  (default tile)" : "");
    return 0;
  }
  if (!o.ab.empty()) return run_ab(o);
  try {
    const entry& e = select(o);
    const std::vector<problem> ps = problems_of(o, e.cfg);
    if (!o.machine)
      std::fprintf(stderr, "kvtile_bench %s: %s on %zu shape(s)\n", std::string(version_string).c_str(), e.cfg.name().c_str(),
                   ps.size());
    std::vector<std::string> labels;
    const auto kv = run_kvtile(o, e, ps, labels, argv[0]);
    if (o.machine) return 0;
    std::map<std::string, std::vector<peer_row>> peers;
    if (o.peers == "auto") {
      if (python_with_torch()) {
        for (std::size_t i = 0; i < ps.size(); ++i) peers[labels[i]] = run_peers(e.cfg, ps[i]);
      } else {
        std::fprintf(stderr, "  peers: skipped (python3 with torch not found)\n");
      }
    }
    print_table(e.cfg, ps, labels, kv, peers, unit_of(ps.front(), e.cfg.device));
    if (!o.results.empty()) write_results(o.results, e.cfg, labels, kv, peers, unit_of(ps.front(), e.cfg.device));
    for (const auto& [label, m] : kv)
      if (m.runs.empty()) return 1;
    return 0;
  } catch (const kvtile::error& err) {
    std::fprintf(stderr, "kvtile_bench: %s\n", err.what());
    return 2;
  }
}
