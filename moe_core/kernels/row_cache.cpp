// The expert-output cache's local tier, per layer step in one call each (router_service/cache.py):
// the rows' key digests, the rows of a step that share a digest, and an LRU index from (layer, digest)
// to the slab slot that holds the row. The same work in Python costs 3-7 us per row, most of a
// cached step's overhead (bench/RESULTS.md, "The expert cache's local tier in one call per step").
//
// A digest is xxh3-128 of a row's record (its input bytes, its expert ids as int32 and its gate weights
// as float32, little-endian), in xxHash's canonical byte order: the bytes of python-xxhash's
// xxh3_128_digest() of the same record, which is the fallback where this library cannot be built.

#include <stdint.h>
#include <string.h>

#include <vector>

#define XXH_INLINE_ALL
#include "xxhash.h"

namespace {

constexpr int32_t NONE = -1;

struct Key {
    uint64_t high, low;
    int32_t layer;
    bool operator==(const Key& o) const { return low == o.low && high == o.high && layer == o.layer; }
};

inline Key key_of(const uint8_t* digest, int32_t layer) {
    XXH128_canonical_t canonical;
    memcpy(canonical.digest, digest, 16);
    const XXH128_hash_t h = XXH128_hashFromCanonical(&canonical);
    return Key{h.high64, h.low64, layer};
}

// The digest is already uniform: its low bits, mixed with the layer, pick the bucket.
inline uint64_t home_of(const Key& k, uint64_t mask) {
    return (k.low ^ (uint64_t(uint32_t(k.layer)) * 0x9E3779B97F4A7C15ull)) & mask;
}

struct Entry {
    Key key;
    int32_t older, newer;  // LRU neighbours, NONE at either end
};

// Slots [0, used) hold entries; buckets map by linear probing to slots, at most half full.
struct Index {
    std::vector<Entry> entries;
    std::vector<int32_t> buckets;
    uint64_t mask;
    int64_t used = 0;
    int32_t oldest = NONE, newest = NONE;

    explicit Index(int64_t slots) : entries(slots) {
        uint64_t n = 16;
        while (n < uint64_t(slots) * 2) n <<= 1;
        buckets.assign(n, NONE);
        mask = n - 1;
    }

    // The bucket holding `k`, or the empty bucket where it would go.
    uint64_t probe(const Key& k) const {
        uint64_t b = home_of(k, mask);
        while (buckets[b] != NONE && !(entries[buckets[b]].key == k)) b = (b + 1) & mask;
        return b;
    }

    void unlink(int32_t s) {
        Entry& e = entries[s];
        if (e.older != NONE) entries[e.older].newer = e.newer; else oldest = e.newer;
        if (e.newer != NONE) entries[e.newer].older = e.older; else newest = e.older;
    }

    void make_newest(int32_t s) {
        Entry& e = entries[s];
        e.older = newest;
        e.newer = NONE;
        if (newest != NONE) entries[newest].newer = s; else oldest = s;
        newest = s;
    }

    // Drop slot `s`'s key from the buckets: backward-shift deletion keeps every probe chain unbroken.
    void erase(int32_t s) {
        uint64_t hole = probe(entries[s].key);
        for (uint64_t next = (hole + 1) & mask; buckets[next] != NONE; next = (next + 1) & mask) {
            const uint64_t home = home_of(entries[buckets[next]].key, mask);
            // `next` may fill the hole when its home does not lie in (hole, next], cyclically
            const bool between = hole <= next ? (hole < home && home <= next) : (hole < home || home <= next);
            if (!between) {
                buckets[hole] = buckets[next];
                hole = next;
            }
        }
        buckets[hole] = NONE;
    }

    int32_t get(const Key& k) {
        const int32_t s = buckets[probe(k)];
        if (s != NONE && s != newest) {
            unlink(s);
            make_newest(s);
        }
        return s;
    }

    int32_t put(const Key& k) {
        if (entries.empty()) return NONE;
        uint64_t b = probe(k);
        int32_t s = buckets[b];
        if (s != NONE) {
            if (s != newest) {
                unlink(s);
                make_newest(s);
            }
            return s;
        }
        if (used < int64_t(entries.size())) {
            s = int32_t(used++);
        } else {  // the least recently used entry gives up its slot
            s = oldest;
            unlink(s);
            erase(s);
            b = probe(k);  // the deletion may have moved buckets
        }
        entries[s].key = k;
        buckets[b] = s;
        make_newest(s);
        return s;
    }
};

}  // namespace

extern "C" {

// out[i] (16 bytes) = digest of row rows[i] (or of row i where rows is null): x holds rows of
// row_bytes bytes, x_stride bytes apart; ids int64 [T, k] and weights float32 [T, k] are contiguous.
void row_cache_digests(const uint8_t* x, int64_t x_stride, int64_t row_bytes, const int64_t* ids,
                       const float* weights, int32_t k, const int64_t* rows, int64_t n, uint8_t* out) {
    std::vector<uint8_t> record(row_bytes + 8 * int64_t(k));
    uint8_t* tail = record.data() + row_bytes;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = rows ? rows[i] : i;
        memcpy(record.data(), x + r * x_stride, row_bytes);
        for (int32_t j = 0; j < k; j++) {
            const int32_t id = int32_t(ids[r * k + j]);
            memcpy(tail + 4 * j, &id, 4);
        }
        memcpy(tail + 4 * k, weights + r * k, 4 * int64_t(k));
        XXH128_canonical_t canonical;
        XXH128_canonicalFromHash(&canonical, XXH3_128bits(record.data(), record.size()));
        memcpy(out + 16 * i, canonical.digest, 16);
    }
}

// first[i] = the first row with digest i's bytes (i itself for the first); returns how many rows repeat one.
int64_t row_cache_firsts(const uint8_t* digests, int64_t n, int64_t* first) {
    uint64_t size = 16;
    while (size < uint64_t(n) * 2) size <<= 1;
    std::vector<int64_t> buckets(size, -1);
    int64_t repeats = 0;
    for (int64_t i = 0; i < n; i++) {
        const Key k = key_of(digests + 16 * i, 0);
        uint64_t b = home_of(k, size - 1);
        while (buckets[b] >= 0 && memcmp(digests + 16 * buckets[b], digests + 16 * i, 16) != 0) b = (b + 1) & (size - 1);
        if (buckets[b] < 0) {
            buckets[b] = i;
            first[i] = i;
        } else {
            first[i] = buckets[b];
            repeats++;
        }
    }
    return repeats;
}

// One layer step's keys in one call: digests of the n rows at x (row_cache_digests), first (row_cache_firsts),
// and slots[i] = the held slot of each first row (row_cache_get), -1 where not held or a repeat.
// Returns how many were held; *repeats gets how many rows repeat an earlier one.
int64_t row_cache_lookup(void* index, int32_t layer, const uint8_t* x, int64_t x_stride, int64_t row_bytes,
                         const int64_t* ids, const float* weights, int32_t k, int64_t n, uint8_t* digests,
                         int64_t* first, int64_t* slots, int64_t* repeats) {
    row_cache_digests(x, x_stride, row_bytes, ids, weights, k, nullptr, n, digests);
    *repeats = row_cache_firsts(digests, n, first);
    Index& t = *static_cast<Index*>(index);
    int64_t held = 0;
    for (int64_t i = 0; i < n; i++) {
        slots[i] = first[i] == i ? t.get(key_of(digests + 16 * i, layer)) : NONE;
        held += slots[i] != NONE;
    }
    return held;
}

void* row_cache_new(int64_t slots) { return new Index(slots); }

void row_cache_free(void* index) { delete static_cast<Index*>(index); }

int64_t row_cache_len(void* index) { return static_cast<Index*>(index)->used; }

// slots[i] = the slot of (layer, digest i), or -1 where not held; the held ones become the most recent.
// Returns how many were held.
int64_t row_cache_get(void* index, int32_t layer, const uint8_t* digests, int64_t n, int64_t* slots) {
    Index& t = *static_cast<Index*>(index);
    int64_t held = 0;
    for (int64_t i = 0; i < n; i++) {
        slots[i] = t.get(key_of(digests + 16 * i, layer));
        held += slots[i] != NONE;
    }
    return held;
}

// slots[i] = the slot that (layer, digest i) now has: its own where held (made the most recent), else
// a never-used slot or the least recently used entry's. The caller writes the rows there. Keys of one
// call never take each other's slots when n is at most the index's size.
void row_cache_put(void* index, int32_t layer, const uint8_t* digests, int64_t n, int64_t* slots) {
    Index& t = *static_cast<Index*>(index);
    for (int64_t i = 0; i < n; i++) slots[i] = t.put(key_of(digests + 16 * i, layer));
}

// Store n rows under (layer, digest i) (row_cache_put) and copy each into its slot of the slab ([slots,
// width] bytes): key i's row is row pick[i] (i where pick is null) of `rows`, row_stride bytes apart.
void row_cache_store(void* index, int32_t layer, const uint8_t* digests, int64_t n, const uint8_t* rows,
                     int64_t row_stride, const int64_t* pick, uint8_t* slab, int64_t width) {
    Index& t = *static_cast<Index*>(index);
    for (int64_t i = 0; i < n; i++) {
        const int32_t slot = t.put(key_of(digests + 16 * i, layer));
        if (slot != NONE) memcpy(slab + int64_t(slot) * width, rows + (pick ? pick[i] : i) * row_stride, width);
    }
}

}  // extern "C"
