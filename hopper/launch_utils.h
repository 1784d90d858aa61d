// Host-side helpers shared by the launch code of the small kernels beside the attention kernel.
#pragma once

#include <cuda_runtime_api.h>

namespace flash3 {

// The largest shared-memory carveout for `kernel`. The kernels launched next to the attention kernel (the FP8 V
// copy and the KV append before it, the split-KV combine after it) use little or no shared memory, but the
// attention kernel takes nearly all of an SM's: asking for the same split spares each SM a change of its L1 /
// shared-memory split between the kernels (session 17, measured together with two other decode changes).
template <class Kernel>
inline cudaError_t prefer_max_shared_carveout(Kernel* kernel) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                              int(cudaSharedmemCarveoutMaxShared));
}

}  // namespace flash3
