/* The per-call work of shm.py's collectives in C: arrive (copy, publish, spin on the peers' flags) and
 * the rank-order sum. Python drives the protocol; this only removes its per-call interpreter cost, which
 * dominates a decode step's all-reduces of a few kilobytes (see shm_native.py). No -ffast-math: every
 * addition is the IEEE one torch's elementwise add does, in the same order. */
#include <stdint.h>
#include <string.h>

/* Copy nbytes from src to this rank's slot, store the generation into this rank's flag, then check each
 * peer's flag up to `spins` times. Returns how many peers had not arrived (the caller waits for them the
 * slow way); *spun gets the checks made, 0 when every peer was there already. */
int64_t sw_arrive(const void *src, void *own_slot, int64_t nbytes, int64_t *words, int64_t own_idx,
                  const int64_t *peer_idx, int64_t npeers, int64_t gen, int64_t spins, int64_t *spun) {
    memcpy(own_slot, src, (size_t)nbytes);
    __atomic_store_n(&words[own_idx], gen, __ATOMIC_RELEASE);
    int64_t missing = 0, total = 0;
    for (int64_t i = 0; i < npeers; ++i) {
        int64_t *flag = &words[peer_idx[i]];
        int64_t s = 0;
        while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) < gen && s < spins) {
            ++s;
            __builtin_ia32_pause();
        }
        total += s;
        if (__atomic_load_n(flag, __ATOMIC_ACQUIRE) < gen) ++missing;
    }
    *spun = total;
    return missing;
}

/* out = ((parts[0] + parts[1]) + parts[2]) + ..., elementwise, float32. */
void sw_sum_f32(float *out, float *const *parts, int64_t world, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        float s = parts[0][i] + parts[1][i];
        for (int64_t r = 2; r < world; ++r) s += parts[r][i];
        out[i] = s;
    }
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, NaN to the canonical quiet NaN: what torch's bfloat16 conversion does. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The same for bfloat16, rounding after each addition as torch's add of two bfloat16 tensors does. */
void sw_sum_bf16(uint16_t *out, uint16_t *const *parts, int64_t world, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        uint16_t s = f32_to_bf16(bf16_to_f32(parts[0][i]) + bf16_to_f32(parts[1][i]));
        for (int64_t r = 2; r < world; ++r) s = f32_to_bf16(bf16_to_f32(s) + bf16_to_f32(parts[r][i]));
        out[i] = s;
    }
}
