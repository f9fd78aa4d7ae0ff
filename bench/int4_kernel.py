"""Benchmark: the decode loop's int4 matrix-vector kernels alone, in C, on one token's SmolLM2-135M shapes.

Compiles the library source of :mod:`nnsqueeze.llm.gemv` + :mod:`nnsqueeze.llm.decode_c` with a small C
``main`` and times, on the same random codes, the general ``nsq_gemv`` loop against the AVX2 kernel
``gemv4_avx2`` (float activations, used by the decode loop on AVX2 CPUs without AVX-512), and the opt-in
int8-activation kernel ``nsq_gemv_a8`` (``act8``: each group of the activations rounded to int8, as
llama.cpp's Q8 does). One "token" is the 210 int4 layers of SmolLM2-135M (30 x q, k, v, o, gate, up, down);
best of 15 per kernel::

    python bench/int4_kernel.py                       # -march=haswell: the AVX2 branches on any x86-64-v3 CPU
    python bench/int4_kernel.py --march native        # on an AVX2 CPU: the build the decode loop uses there

Needs a C compiler with OpenMP (``cc``). Time it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from nnsqueeze.env import cpu_model
from nnsqueeze.llm import decode_c, gemv

MAIN = r"""
#include <stdio.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
typedef struct { int N, K, G; uint8_t* W; float* S; uint8_t* Z; } mat;
int main(int argc, char** argv) {
  int g = atoi(argv[1]), threads = atoi(argv[2]);
  int shapes[7][2] = {{576, 576}, {192, 576}, {192, 576}, {576, 576}, {1536, 576}, {1536, 576}, {576, 1536}};
  int nm = 30 * 7;
  mat* ms = malloc(sizeof(mat) * nm);
  srand(1);
  for (int i = 0; i < nm; i++) {
    mat* m = &ms[i]; m->N = shapes[i % 7][0]; m->K = shapes[i % 7][1]; m->G = m->K / g;
    m->W = malloc((size_t)m->N * m->K / 2); m->S = malloc(sizeof(float) * m->N * m->G); m->Z = malloc(m->N * m->G);
    for (size_t j = 0; j < (size_t)m->N * m->K / 2; j++) m->W[j] = rand() & 255;
    for (int j = 0; j < m->N * m->G; j++) { m->S[j] = 0.01f * (1 + rand() % 100); m->Z[j] = 8; }
  }
  static float x[1536], y[1536], y2[1536], y3[1536], eo[1536];
  for (int k = 0; k < 1536; k++) x[k] = (rand() % 2001 - 1000) / 1000.f;
  double best[3] = {1e9, 1e9, 1e9}, maxd = 0, maxd8 = 0, maxy = 0;
  for (int rep = 0; rep < 15; rep++)
    for (int v = 0; v < 3; v++) {
      double t = now();
      for (int i = 0; i < nm; i++) {
        mat* m = &ms[i];
        if (v == 0) nsq_gemv(4, 1, m->N, m->K, m->G, g, m->W, m->S, m->Z, x, NULL, y, threads);
        else if (v == 1) gemv4_avx2(m->N, m->K, m->G, g, m->W, m->S, m->Z, x, NULL, y2, eo, threads);
        else nsq_gemv_a8(4, 1, m->N, m->K, m->G, g, m->W, m->S, m->Z, x, NULL, y3, threads);
      }
      t = now() - t;
      if (t < best[v]) best[v] = t;
    }
  for (int n = 0; n < ms[nm - 1].N; n++) {
    if (fabs(y[n] - y2[n]) > maxd) maxd = fabs(y[n] - y2[n]);
    if (fabs(y[n] - y3[n]) > maxd8) maxd8 = fabs(y[n] - y3[n]);
    if (fabs(y[n]) > maxy) maxy = fabs(y[n]);
  }
  printf("| g%d | %d | %.2f | %.2f | %.2fx | %.2g | %.2f | %.2fx | %.2g | %.3g |\n", g, threads, best[0] * 1e3,
         best[1] * 1e3, best[0] / best[1], maxd, best[2] * 1e3, best[1] / best[2], maxd8, maxy);
  return 0;
}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--march", default="haswell", help="gcc -march (haswell: AVX2 + FMA, no AVX-512)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "k.c", Path(tmp) / "k"
        src.write_text(gemv.SOURCE + decode_c.DECODE_SOURCE + MAIN)
        subprocess.run(["cc", "-O3", f"-march={a.march}", "-fopenmp", str(src), "-o", str(exe), "-lm"], check=True)
        print(f"# CPU: {cpu_model()}, -march={a.march}; one token's 210 int4 layers, ms, best of 15")
        print("| group | threads | nsq_gemv ms | gemv4_avx2 ms | speed-up | max abs difference | nsq_gemv_a8 ms "
              "(int8 activations) | vs gemv4_avx2 | its max abs difference | outputs up to |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for threads in (1, 2):
            for g in (32, 64):
                print(subprocess.run([str(exe), str(g), str(threads)], check=True, capture_output=True,
                                     text=True).stdout, end="")


if __name__ == "__main__":
    main()
