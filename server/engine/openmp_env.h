// ApplyOpenMpDefaults: the OpenMP waiting the CPU engine needs, for a process that did not choose
// its own.
//
// oneDNN runs each primitive as an OpenMP parallel region, about 130 of them in a forward pass.
// With libgomp's default waiting its team threads reach each region late: the fp32 forward pass
// ran 10–20 % slower than with OMP_WAIT_POLICY=active, in the server and offline alike
// (docs/PERFORMANCE.md). Active waiting with a bounded spin (GOMP_SPINCOUNT=100000) keeps that
// speed and still lets idle threads sleep: an idle server used no CPU over 5 s.
//
// OpenBLAS (under FAISS, the gallery's exact search) picks its kernels by CPU model, and Debian's
// 0.3.21 does not know recent ones (Emerald Rapids, family 6 model 207): it fell back to SSE3
// kernels, 3x slower than its AVX-512 ones (docs/BENCHMARKS.md, "Gallery search"). So
// OPENBLAS_CORETYPE is set by instruction set: SkylakeX with AVX-512 (F, BW, VL, DQ, CD),
// Haswell with AVX2 and FMA.
//
// Contract
// - libgomp and OpenBLAS read these variables when they are loaded, before main(); so when
//   neither OpenMP variable is set (then both are set) or OPENBLAS_CORETYPE is unset and the CPU
//   has one of the instruction sets above, this sets them and re-executes the program
//   (/proc/self/exe, same argv and pid) and never returns. Otherwise it returns a line for the
//   start-up log saying what is in effect. A variable the caller set is never changed.
// - Call it first thing in main(), before any thread of the program's own exists (an exec ends
//   all threads). If the re-exec fails, it returns and the process runs with libgomp's defaults;
//   the returned line says so. ARCFACE_OPENMP_DEFAULTS=0 skips it.
#ifndef ARCFACE_SERVER_ENGINE_OPENMP_ENV_H_
#define ARCFACE_SERVER_ENGINE_OPENMP_ENV_H_

#include <string>

namespace arcface::engine {

std::string ApplyOpenMpDefaults(char** argv);

}  // namespace arcface::engine

#endif  // ARCFACE_SERVER_ENGINE_OPENMP_ENV_H_
