#include <immintrin.h>
#include <stdio.h>
#include <omp.h>
int main(){
  // 12 independent FMA chains per thread hide the FMA latency; 2 flops x 16 lanes each
  const long iters = 50000000L;
  double t0 = omp_get_wtime();
  float sink = 0;
  #pragma omp parallel reduction(+:sink)
  {
    __m512 a[12]; __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    for (int i=0;i<12;i++) a[i]=_mm512_set1_ps((float)i);
    for (long it=0; it<iters; ++it){
      #pragma GCC unroll 12
      for (int i=0;i<12;i++) a[i]=_mm512_fmadd_ps(a[i],b,c);
    }
    for (int i=0;i<12;i++) sink += _mm512_reduce_add_ps(a[i]);
  }
  double t = omp_get_wtime()-t0;
  int n = omp_get_max_threads();
  printf("%d threads %.1f GFLOP/s (sink %g)\n", n, (double)iters*12*16*2*n/t/1e9, sink);
}
