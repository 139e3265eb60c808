/* The compute ceiling of Adam's update in cache, for three operation orders.
 *
 * fastadam (like torch's fused Adam, bit for bit) computes p + ((-s)*m) / (sqrt(v)/r2 + eps):
 * two divisions and a square root per element. DeepSpeed's loop multiplies by a
 * precomputed 1/r2 instead (one division: faster, rounded differently). The third order
 * has no division at all, for scale. Built and run by in_cache_bound.py with fastadam's
 * flags (-O3 -fno-math-errno -ffp-contract=off) at x86-64-v3 and v4, buffers resident in
 * L1/L2 and staggered against 4K aliasing; best of 15 runs.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
__attribute__((noinline)) void torch_order(float*restrict p,const float*restrict g,float*restrict m,float*restrict v,long n,float w,float b2,float omb2,float ns,float r2,float eps){
  for(long i=0;i<n;i++){float gi=g[i];float mi=m[i]+w*(gi-m[i]);float vi=v[i]*b2+(omb2*gi)*gi;m[i]=mi;v[i]=vi;p[i]=p[i]+(ns*mi)/(sqrtf(vi)/r2+eps);}}
__attribute__((noinline)) void recip_order(float*restrict p,const float*restrict g,float*restrict m,float*restrict v,long n,float w,float b2,float omb2,float ns,float ir2,float eps){
  for(long i=0;i<n;i++){float gi=g[i];float mi=m[i]+w*(gi-m[i]);float vi=v[i]*b2+(omb2*gi)*gi;m[i]=mi;v[i]=vi;p[i]=p[i]+ns*mi/(sqrtf(vi)*ir2+eps);}}
__attribute__((noinline)) void rsqrt_like(float*restrict p,const float*restrict g,float*restrict m,float*restrict v,long n,float w,float b2,float omb2,float ns,float ir2,float eps){
  for(long i=0;i<n;i++){float gi=g[i];float mi=m[i]+w*(gi-m[i]);float vi=v[i]*b2+(omb2*gi)*gi;m[i]=mi;v[i]=vi;p[i]=p[i]+ns*mi*(sqrtf(vi)*ir2+eps);}}
int main(int argc,char**argv){long n=atol(argv[1]);int reps=atoi(argv[2]);
  float*p=aligned_alloc(64,n*4+4096),*g=aligned_alloc(64,n*4+4096),*m=aligned_alloc(64,n*4+4096),*v=aligned_alloc(64,n*4+4096);
  g=(float*)((char*)g+512);m=(float*)((char*)m+1024);v=(float*)((char*)v+2048);
  for(long i=0;i<n;i++){p[i]=1;g[i]=0.1f;m[i]=0;v[i]=0.01f;}
  double best[3]={1e9,1e9,1e9};
  for(int r=0;r<15;r++){
    double t=now();for(int k=0;k<reps;k++)torch_order(p,g,m,v,n,0.1f,0.999f,0.001f,-1e-3f,0.0316f,1e-8f);t=now()-t;if(t<best[0])best[0]=t;
    t=now();for(int k=0;k<reps;k++)recip_order(p,g,m,v,n,0.1f,0.999f,0.001f,-1e-3f,31.6f,1e-8f);t=now()-t;if(t<best[1])best[1]=t;
    t=now();for(int k=0;k<reps;k++)rsqrt_like(p,g,m,v,n,0.1f,0.999f,0.001f,-1e-3f,31.6f,1e-8f);t=now()-t;if(t<best[2])best[2]=t;}
  printf("n=%ld: 2 div+sqrt (torch order) %.2f Gelem/s; 1 div+sqrt (reciprocal) %.2f Gelem/s; 0 div+sqrt %.2f Gelem/s\n",n,n*(double)reps/best[0]/1e9,n*(double)reps/best[1]/1e9,n*(double)reps/best[2]/1e9);}
