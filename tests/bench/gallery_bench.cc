// gallery_bench: 1:N search over N random unit vectors (seeded), side by side in one run:
// (a) FAISS's IndexFlatIP called directly on the same matrix, (b) the server's exact index
// (MakeFlatIndex), (c) HNSW at several efSearch values with recall@10 against exact; probes/s,
// p50 and p99 latency per call for each batch of probes; HNSW build time; resident memory per
// million faces. Prints the CPU, BLAS and OpenMP settings first (a ratio holds only for them) and
// one table last. docs/BENCHMARKS.md ("Gallery search") records a run and its command.
#include <dlfcn.h>
#include <link.h>
#include <omp.h>
#include <time.h>
#include <unistd.h>

#include <faiss/IndexFlat.h>
#include <faiss/utils/distances.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <fstream>
#include <memory>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "server/engine/openmp_env.h"
#include "server/gallery/galleries.h"
#include "server/gallery/gallery_store.h"
#include "server/gallery/hnsw_index.h"
#include "server/gallery/ids.h"
#include "server/gallery/sqlite_store.h"
#include "server/gallery/vector_index.h"
#include "tests/bench/machine_info.h"
#include "tests/gallery/random_units.h"

namespace {

using arcface::bench::CpuModel;
using arcface::bench::LoadAverage;
using arcface::gallery::kDim;
using Clock = std::chrono::steady_clock;
constexpr int kRecallK = 10;

// The BLAS FAISS runs on: the loaded libblas, its symlinks (Debian's alternatives) resolved.
std::string LoadedBlas() {
  std::set<std::string> found;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        const std::string name = info->dlpi_name ? info->dlpi_name : "";
        if (name.find("blas") != std::string::npos) {
          char* real = realpath(name.c_str(), nullptr);
          static_cast<std::set<std::string>*>(out)->insert(real ? real : name);
          std::free(real);
        }
        return 0;
      },
      &found);
  std::string blas = found.empty() ? "none loaded" : absl::StrJoin(found, ", ");
  // OpenBLAS picks its kernels by CPU model when it loads; on a model it does not know it falls
  // back to old SSE kernels (OPENBLAS_CORETYPE overrides): say which it took.
  using Name = char* (*)();
  if (auto corename = reinterpret_cast<Name>(dlsym(RTLD_DEFAULT, "openblas_get_corename"))) {
    const char* env = std::getenv("OPENBLAS_CORETYPE");
    blas += absl::StrFormat(" (OpenBLAS core %s%s)", corename(),
                            env ? absl::StrCat(", OPENBLAS_CORETYPE=", env) : "");
  }
  return blas;
}

// Resident set size now (not the peak): the difference around a build is what it keeps.
double RssBytes() {
  std::ifstream in("/proc/self/statm");
  long pages_total = 0, pages_resident = 0;
  in >> pages_total >> pages_resident;
  return static_cast<double>(pages_resident) * sysconf(_SC_PAGESIZE);
}

double ProcessCpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + t.tv_nsec * 1e-9;
}

struct Timing {
  double probes_per_s = 0;
  double p50_ms = 0;
  double p99_ms = 0;
  // CPU time of the process per call: on a machine that other jobs load, a steadier figure of
  // the work than wall time (OpenMP threads that spin while waiting count too).
  double cpu_ms = 0;
  int64_t calls = 0;
};

// `callers` threads each call search(probes, nq, sims, rows) on successive batches of the pool
// (each its own answer buffers) for `seconds`, at least 3 calls each, after one warm-up call.
template <typename Search>
Timing Measure(const Search& search, const std::vector<float>& pool, int batch, double seconds,
               int callers) {
  const int batches = static_cast<int>(pool.size() / kDim) / batch;
  auto probes = [&](int64_t call) {
    return pool.data() + static_cast<size_t>(call % batches) * batch * kDim;
  };
  const size_t answers = static_cast<size_t>(batch) * kRecallK;
  {
    std::vector<float> sims(answers);
    std::vector<int64_t> rows(answers);
    search(probes(0), batch, sims.data(), rows.data());
  }
  std::vector<std::vector<double>> latencies(callers);
  const double cpu_start = ProcessCpuSeconds();
  const auto start = Clock::now();
  auto run = [&](int caller) {
    std::vector<float> sims(answers);
    std::vector<int64_t> rows(answers);
    std::vector<double>& mine = latencies[caller];
    for (int64_t call = 1 + caller;; call += callers) {
      const auto t0 = Clock::now();
      search(probes(call), batch, sims.data(), rows.data());
      const auto t1 = Clock::now();
      mine.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      if (mine.size() >= 3 && std::chrono::duration<double>(t1 - start).count() >= seconds) break;
    }
  };
  std::vector<std::thread> threads;
  for (int c = 1; c < callers; ++c) threads.emplace_back(run, c);
  run(0);
  for (std::thread& t : threads) t.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<double> all;
  for (const auto& mine : latencies) all.insert(all.end(), mine.begin(), mine.end());
  Timing timing;
  timing.calls = static_cast<int64_t>(all.size());
  timing.cpu_ms = (ProcessCpuSeconds() - cpu_start) * 1e3 / static_cast<double>(timing.calls);
  timing.probes_per_s = static_cast<double>(timing.calls) * batch / elapsed;
  std::sort(all.begin(), all.end());
  auto quantile = [&](double q) {
    return all[std::min(all.size() - 1, static_cast<size_t>(q * all.size()))];
  };
  timing.p50_ms = quantile(0.50);
  timing.p99_ms = quantile(0.99);
  return timing;
}

struct Row {
  size_t n;
  std::string method;
  int batch;
  Timing timing;
  double recall = -1;      // recall@10 against exact; -1: exact by construction
  double vs_faiss = -1;    // FAISS alone's CPU time per probe over this one's (same N, batch)
};

void PrintRow(const Row& r) {
  std::printf("| %8zu | %-26s | %5d | %10.1f | %8.3f | %8.3f | %8.3f | %s | %s |\n", r.n,
              r.method.c_str(), r.batch, r.timing.probes_per_s, r.timing.p50_ms, r.timing.p99_ms,
              r.timing.cpu_ms,
              r.recall < 0 ? "  exact " : absl::StrFormat("  %.4f", r.recall).c_str(),
              r.vs_faiss < 0 ? "      " : absl::StrFormat(" %.2fx", r.vs_faiss).c_str());
  std::fflush(stdout);
}

// The share of each probe's true top-10 that `rows` (nq × 10) holds.
double Recall(const std::vector<int64_t>& truth, const std::vector<int64_t>& rows) {
  size_t found = 0;
  for (size_t q = 0; q < truth.size() / kRecallK; ++q) {
    const std::set<int64_t> want(truth.begin() + q * kRecallK, truth.begin() + (q + 1) * kRecallK);
    for (int j = 0; j < kRecallK; ++j) found += want.count(rows[q * kRecallK + j]);
  }
  return static_cast<double>(found) / static_cast<double>(truth.size());
}

// Probes: uniform on the sphere (cosine 0), or each a random gallery face mixed with noise to
// the given cosine (a new photo of an enrolled face).
std::vector<float> MakeProbes(const std::vector<float>& units, int count, double cosine,
                              uint64_t seed) {
  std::vector<float> probes = arcface::gallery::testing::RandomUnits(count, seed);
  if (cosine <= 0) return probes;
  const size_t n = units.size() / kDim;
  std::mt19937_64 rng(seed + 1);
  for (int q = 0; q < count; ++q) {
    float* p = probes.data() + static_cast<size_t>(q) * kDim;
    const float* face = units.data() + (rng() % n) * kDim;
    // noise ⟂ face, then p = c·face + sqrt(1-c²)·noise: unit length, cos(p, face) = c.
    const double along = arcface::gallery::testing::Dot(p, face);
    double norm2 = 0;
    for (int j = 0; j < kDim; ++j) {
      p[j] = static_cast<float>(p[j] - along * face[j]);
      norm2 += static_cast<double>(p[j]) * p[j];
    }
    const double s = std::sqrt((1 - cosine * cosine) / norm2);
    for (int j = 0; j < kDim; ++j) p[j] = static_cast<float>(cosine * face[j] + s * p[j]);
  }
  return probes;
}

// Enrolls the n faces of `units` into `galleries` (gallery "bench"): the first `single` one face
// per call (a subject each, one durable transaction each: the rate of clients enrolling one
// photo), the rest `per_call` faces per call (a bulk import). Returns a note with both rates.
absl::StatusOr<std::string> EnrollAll(arcface::gallery::Galleries& galleries,
                                      const std::vector<float>& units, size_t single,
                                      size_t per_call) {
  const size_t n = units.size() / kDim;
  single = std::min(single, n);
  double single_s = 0, bulk_s = 0;
  size_t done = 0;
  for (size_t call = 0; done < n; ++call) {
    const size_t count = done < single ? 1 : std::min(per_call, n - done);
    arcface::gallery::EnrollWrite write;
    write.gallery = "bench";
    write.model_id = "bench-model";
    write.subject_id = absl::StrFormat("subject-%zu", call);
    for (size_t i = 0; i < count; ++i) write.face_ids.push_back(arcface::gallery::NewFaceId());
    write.embeddings.assign(units.begin() + done * kDim, units.begin() + (done + count) * kDim);
    const auto t0 = Clock::now();
    auto result = galleries.Enroll(write);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (!result.ok()) return result.status();
    (done < single ? single_s : bulk_s) += s;
    done += count;
  }
  return absl::StrFormat(
      "enrollment (embeddings given, SQLite, durable per call): %zu calls of 1 face: %.0f "
      "faces/s; %zu faces in calls of %zu: %.0f faces/s",
      single, single / std::max(single_s, 1e-9), n - single, per_call,
      (n - single) / std::max(bulk_s, 1e-9));
}

}  // namespace

int main(int argc, char** argv) {
  // The server's OpenMP waiting (server/engine/openmp_env.h), so that the figures compare.
  const std::string openmp = arcface::engine::ApplyOpenMpDefaults(argv);
  // The server's FAISS settings (MakeFlatIndex sets them once) for FAISS alone too; the flags
  // below may change them for both.
  (void)arcface::gallery::MakeFlatIndex();
  CLI::App app{"1:N search over random unit vectors: FAISS alone, the server's exact index, HNSW"};
  std::vector<size_t> sizes = {10000, 100000, 1000000};
  std::vector<int> batches = {1, 32};
  std::vector<int> ef_searches = {64, 128, 256, 512};
  size_t hnsw_max = SIZE_MAX;
  double seconds = 3;
  int threads = 0;
  int callers = 1;
  int recall_probes = 500;
  double probe_cosine = 0;
  uint64_t seed = 1;
  arcface::gallery::HnswOptions hnsw;
  std::string store_dir;
  size_t single_enrolls = 2000;
  app.add_option("--sizes", sizes, "gallery sizes (faces)")->delimiter(',');
  app.add_option("--batch", batches, "probes per call")->delimiter(',');
  app.add_option("--seconds", seconds, "measuring time per method, size and batch");
  app.add_option("--threads", threads, "OpenMP threads (0: OpenMP's default)");
  app.add_option("--callers", callers, "threads calling each search at once (the server's calls)")
      ->check(CLI::PositiveNumber);
  app.add_option("--ef-search", ef_searches, "HNSW efSearch values (empty: no HNSW)")
      ->delimiter(',');
  app.add_option("--hnsw-m", hnsw.m, "HNSW graph degree M");
  app.add_option("--hnsw-ef-construction", hnsw.ef_construction, "HNSW build-time beam");
  app.add_option("--hnsw-max", hnsw_max, "largest gallery to build HNSW for (it takes minutes)");
  app.add_option("--recall-probes", recall_probes, "probes for recall@10");
  app.add_option("--probe-cosine", probe_cosine,
                 "0: random probes; c > 0: each probe a gallery face at cosine c");
  app.add_option("--store-dir", store_dir,
                 "also the server's path: enroll into a SQLite file here, Identify in-process, "
                 "reload (the file is deleted after)");
  app.add_option("--single-enrolls", single_enrolls, "enrollments of one face each, timed");
  app.add_option("--seed", seed, "seed of the gallery (probes use seed+1...)");
  app.add_option("--blas-threshold", faiss::distance_compute_blas_threshold,
                 "FAISS: probes per call from which it uses BLAS");
  app.add_option("--blas-query-bs", faiss::distance_compute_blas_query_bs,
                 "FAISS: BLAS block of probes");
  app.add_option("--blas-database-bs", faiss::distance_compute_blas_database_bs,
                 "FAISS: BLAS block of gallery rows");
  CLI11_PARSE(app, argc, argv);
  if (threads > 0) omp_set_num_threads(threads);
  const int max_batch = *std::max_element(batches.begin(), batches.end());

  std::printf("CPU: %s\nload average (1 min) at start: %.2f\nBLAS: %s\n%s, %d OpenMP threads\n",
              CpuModel().c_str(), LoadAverage(), LoadedBlas().c_str(), openmp.c_str(),
              omp_get_max_threads());
  std::printf("FAISS: distance_compute_blas_threshold=%d query_bs=%d database_bs=%d\n",
              faiss::distance_compute_blas_threshold, faiss::distance_compute_blas_query_bs,
              faiss::distance_compute_blas_database_bs);
  std::printf("callers at once: %d; probes: %s; HNSW M=%d efConstruction=%d\n\n", callers,
              probe_cosine > 0 ? absl::StrFormat("gallery faces at cosine %.2f", probe_cosine).c_str()
                               : "random unit vectors",
              hnsw.m, hnsw.ef_construction);

  std::vector<Row> rows;
  std::vector<std::string> notes;
  auto record = [&](Row row) {
    PrintRow(row);
    rows.push_back(std::move(row));
  };
  for (const size_t n : sizes) {
    auto t0 = Clock::now();
    std::vector<float> units = arcface::gallery::testing::RandomUnits(n, seed);
    std::printf("N=%zu: %zu random unit vectors in %.1f s\n", n, n,
                std::chrono::duration<double>(Clock::now() - t0).count());
    const std::vector<float> pool =
        MakeProbes(units, std::max(1024, recall_probes), probe_cosine, seed + 1);
    // (a) FAISS alone; its exact top-10 is the truth for recall.
    std::vector<int64_t> truth(static_cast<size_t>(recall_probes) * kRecallK);
    std::vector<double> faiss_cpu_ms(max_batch + 1, 0);
    {
      faiss::IndexFlatIP flat(kDim);
      flat.add(static_cast<faiss::Index::idx_t>(n), units.data());
      std::vector<float> sims(static_cast<size_t>(std::max(max_batch, recall_probes)) * kRecallK);
      std::vector<faiss::Index::idx_t> ids(sims.size());
      flat.search(recall_probes, pool.data(), kRecallK, sims.data(), ids.data());
      std::copy(ids.begin(), ids.begin() + truth.size(), truth.begin());
      for (int batch : batches) {
        Row row{n, "faiss IndexFlatIP", batch, {}};
        row.timing = Measure(
            [&](const float* probes, int nq, float* sims, int64_t* rows) {
              flat.search(nq, probes, kRecallK, sims, rows);
            },
            pool, batch, seconds, callers);
        faiss_cpu_ms[batch] = row.timing.cpu_ms;
        record(row);
      }
    }
    // (b) The server's exact index, on its own copy of the matrix.
    {
      const double rss0 = RssBytes();
      std::unique_ptr<arcface::gallery::VectorIndex> flat = arcface::gallery::MakeFlatIndex();
      if (absl::Status s = flat->Add(units.data(), n); !s.ok()) {
        std::fprintf(stderr, "flat index Add: %s\n", s.ToString().c_str());
        return 1;
      }
      notes.push_back(absl::StrFormat(
          "N=%zu: %s index holds %.2f GB of RSS per million faces (bytes() %.2f GB/M)", n,
          flat->Describe(), (RssBytes() - rss0) / n * 1e6 / 1e9,
          static_cast<double>(flat->bytes()) / n * 1e6 / 1e9));
      std::vector<float> sims(static_cast<size_t>(std::max(max_batch, recall_probes)) * kRecallK);
      std::vector<int64_t> found(sims.size());
      if (absl::Status s =
              flat->Search(pool.data(), recall_probes, kRecallK, sims.data(), found.data());
          !s.ok()) {
        std::fprintf(stderr, "flat index Search: %s\n", s.ToString().c_str());
        return 1;
      }
      found.resize(truth.size());
      const double agreement = Recall(truth, found);
      if (agreement < 1) {
        notes.push_back(absl::StrFormat("N=%zu: flat index agrees with FAISS on %.5f of the top-10",
                                        n, agreement));
      }
      for (int batch : batches) {
        Row row{n, "flat (server index)", batch, {}};
        row.timing = Measure(
            [&](const float* probes, int nq, float* sims, int64_t* rows) {
              (void)flat->Search(probes, nq, kRecallK, sims, rows);
            },
            pool, batch, seconds, callers);
        row.vs_faiss = faiss_cpu_ms[batch] / row.timing.cpu_ms;
        record(row);
      }
    }
    // (c) HNSW at each efSearch, recall@10 against (a).
    if (!ef_searches.empty() && n <= hnsw_max) {
      std::vector<int64_t> slots(n);
      std::iota(slots.begin(), slots.end(), 0);
      const double rss0 = RssBytes();
      t0 = Clock::now();
      auto built = arcface::gallery::HnswIndex::Build(hnsw, units.data(), slots.data(), n);
      const double build_s = std::chrono::duration<double>(Clock::now() - t0).count();
      if (!built.ok()) {
        std::fprintf(stderr, "HNSW build: %s\n", built.status().ToString().c_str());
        return 1;
      }
      notes.push_back(absl::StrFormat(
          "N=%zu: HNSW(M=%d, efConstruction=%d) built in %.1f s (%.0f faces/s), %.2f GB of RSS "
          "per million faces",
          n, hnsw.m, hnsw.ef_construction, build_s, n / build_s,
          (RssBytes() - rss0) / n * 1e6 / 1e9));
      for (int ef : ef_searches) {
        std::vector<float> sims(static_cast<size_t>(std::max(max_batch, recall_probes)) * kRecallK);
        std::vector<int64_t> found(sims.size());
        if (absl::Status s = (*built)->SetEfSearch(ef); !s.ok()) {
          std::fprintf(stderr, "HNSW: %s\n", s.ToString().c_str());
          return 1;
        }
        if (absl::Status s =
                (*built)->Search(pool.data(), recall_probes, kRecallK, sims.data(), found.data());
            !s.ok()) {
          std::fprintf(stderr, "HNSW Search: %s\n", s.ToString().c_str());
          return 1;
        }
        found.resize(truth.size());
        const double recall = Recall(truth, found);
        for (int batch : batches) {
          Row row{n, absl::StrFormat("hnsw efSearch=%d", ef), batch, {}};
          row.timing = Measure(
              [&](const float* probes, int nq, float* sims, int64_t* slots) {
                (void)(*built)->Search(probes, nq, kRecallK, sims, slots);
              },
              pool, batch, seconds, callers);
          row.recall = recall;
          row.vs_faiss = faiss_cpu_ms[batch] / row.timing.cpu_ms;
          record(row);
        }
      }
    }
    // (d) The server's path: Galleries over a SQLite file, Identify in-process (top_k 10),
    // then a restart's load.
    if (store_dir.empty()) continue;
    const std::string path = absl::StrFormat("%s/gallery_bench_%zu.db", store_dir, n);
    std::remove(path.c_str());
    for (const char* suffix : {"-wal", "-shm"}) std::remove((path + suffix).c_str());
    auto open = [&]() -> absl::StatusOr<std::unique_ptr<arcface::gallery::Galleries>> {
      auto store = arcface::gallery::OpenSqliteStore(path);
      if (!store.ok()) return store.status();
      return arcface::gallery::Galleries::Open(std::move(*store), {});
    };
    {
      auto galleries = open();
      if (!galleries.ok()) {
        std::fprintf(stderr, "open %s: %s\n", path.c_str(), galleries.status().ToString().c_str());
        return 1;
      }
      t0 = Clock::now();
      auto enrolled = EnrollAll(**galleries, units, single_enrolls, 1000);
      if (!enrolled.ok()) {
        std::fprintf(stderr, "enroll: %s\n", enrolled.status().ToString().c_str());
        return 1;
      }
      notes.push_back(absl::StrFormat("N=%zu: %s (%.0f s in all)", n, *enrolled,
                                      std::chrono::duration<double>(Clock::now() - t0).count()));
    }
    units = std::vector<float>();
    const double rss0 = RssBytes();
    const double cpu0 = ProcessCpuSeconds();
    auto galleries = open();
    const double load_cpu = ProcessCpuSeconds() - cpu0;
    if (!galleries.ok()) {
      std::fprintf(stderr, "reopen %s: %s\n", path.c_str(), galleries.status().ToString().c_str());
      return 1;
    }
    notes.push_back(absl::StrFormat(
        "N=%zu: restart: %zu faces loaded from SQLite in %.1f s (Galleries::load_seconds; %.1f s "
        "of CPU), %.2f GB of RSS per million faces",
        n, n, (*galleries)->load_seconds(), load_cpu, (RssBytes() - rss0) / n * 1e6 / 1e9));
    for (int batch : batches) {
      Row row{n, "Galleries::Identify top10", batch, {}};
      row.timing = Measure(
          [&](const float* probes, int nq, float*, int64_t*) {
            std::vector<std::vector<arcface::gallery::Candidate>> results;
            uint64_t version = 0;
            absl::Status s = (*galleries)->Identify("bench", "bench-model", probes, nq, kRecallK,
                                                    std::nullopt, &results, &version);
            if (!s.ok()) std::fprintf(stderr, "Identify: %s\n", s.ToString().c_str());
          },
          pool, batch, seconds, callers);
      row.vs_faiss = faiss_cpu_ms[batch] / row.timing.cpu_ms;
      record(row);
    }
    galleries->reset();
    std::remove(path.c_str());
  }

  std::printf(
      "\n| faces N | method | batch | probes/s | p50 ms | p99 ms | CPU ms/call | recall@10 | "
      "FAISS CPU / this |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) PrintRow(r);
  std::printf("\n");
  for (const std::string& note : notes) std::printf("%s\n", note.c_str());
  std::printf("load average (1 min) at end: %.2f\n", LoadAverage());
  return 0;
}
