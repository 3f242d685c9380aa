/*
 * Decoding a fuzzer's input: little-endian fields read one after the
 * other; bytes past the end read as zero, so every input decodes.
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef FUZZ_INPUT_H
#define FUZZ_INPUT_H

typedef struct Input {
    const uint8_t *p, *end;
} Input;

static inline bool in_more(const Input *in)
{
    return in->p < in->end;
}

static inline uint64_t in_get(Input *in, int bytes)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < bytes && in->p < in->end; i++) {
        v |= (uint64_t)*in->p++ << (8 * i);
    }
    return v;
}

#define U8(in)  ((unsigned)in_get(in, 1))
#define U16(in) ((unsigned)in_get(in, 2))
#define U24(in) ((unsigned)in_get(in, 3))
#define U64(in) in_get(in, 8)

#endif
