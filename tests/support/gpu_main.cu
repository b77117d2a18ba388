// Main of every GPU test executable: runs doctest when a CUDA device is present, otherwise
// reports the tests as skipped through exit code 77 (ctest's SKIP_RETURN_CODE).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cuda_runtime.h>

int main(int argc, char** argv) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    std::printf("no CUDA device (%s): GPU tests skipped\n", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return 77;
  }
  doctest::Context ctx(argc, argv);
  return ctx.run();
}
