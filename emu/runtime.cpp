//! The emulator's runtime: runs a kernel's blocks on worker threads and each block's
//! threads as cooperatively switched fibers, with block barriers and warp collectives.
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace emu {

thread_local ThreadCtx* current = nullptr;

namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr int kMaxThreads = 1024;

enum class State { Runnable, WaitBlock, WaitWarp, WaitNamed, Done };

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in
// *save_sp and resumes the context whose stack pointer is new_sp.
extern "C" void emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch,.-emu_switch
)");
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

/// One queued wgmma of a thread (see wgmma_issue); `group` is -1 until committed.
struct WgmmaOp {
    uint64_t desc_a, desc_b;
    float* d;
    int n, group;
};

struct Fiber {
    Context ctx;
    ThreadCtx t;
    State state = State::Runnable;
    int named_id = 0;          // the named barrier a WaitNamed fiber waits at
    long spins = 0;            // consecutive polls of the current wait
    std::vector<WgmmaOp> wgmma;
    int wgmma_groups = 0;      // groups committed so far
};

/// A queued TMA load (see tma_load).
struct TmaOp {
    unsigned char* dst;
    TensorMapDesc map;
    int coords[5];
    uint64_t* bar;
};

constexpr int kNamedBarriers = 16;
constexpr long kMaxSpins = 1L << 24;

struct Warp {
    int live = 0;
    int arrived = 0;
    int parity = 0;  // which of the two slot buffers the next collective uses
    alignas(16) unsigned char slots[2][32 * kSlotBytes];
};

/// One worker's view of the block it runs: its fibers, barriers and warp buffers.
struct Block {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    int live = 0;
    int arrived = 0;
    Context scheduler;
    void (*invoke)(void**) = nullptr;
    void** args = nullptr;
    unsigned char* stacks = nullptr;
    size_t stack_region = 0;
    unsigned char* dsmem = nullptr;  // dynamic shared memory
    size_t dsmem_bytes = 0;
    int named_arrived[kNamedBarriers] = {};
    std::vector<TmaOp> tma;
};

thread_local Block* block = nullptr;

[[noreturn]] void die(const char* what) {
    std::fprintf(stderr, "emulator: %s\n", what);
    std::abort();
}

Fiber& me() { return block->fibers[size_t(current->linear)]; }

void yield_to_scheduler() {
#if defined(__x86_64__)
    emu_switch(&me().ctx.sp, block->scheduler.sp);
#else
    swapcontext(&me().ctx.uc, &block->scheduler.uc);
#endif
}

void release_block() {
    for (auto& f : block->fibers)
        if (f.state == State::WaitBlock) f.state = State::Runnable;
    block->arrived = 0;
}

void release_warp(int w) {
    Warp& wp = block->warps[size_t(w)];
    for (int l = 0; l < 32; ++l) {
        size_t i = size_t(w) * 32 + size_t(l);
        if (i < block->fibers.size() && block->fibers[i].state == State::WaitWarp)
            block->fibers[i].state = State::Runnable;
    }
    wp.arrived = 0;
}

void fiber_main() {
    block->invoke(block->args);
    Fiber& f = me();
    f.state = State::Done;
    block->live -= 1;
    Warp& wp = block->warps[size_t(current->linear / 32)];
    wp.live -= 1;
    if (block->arrived > 0 && block->arrived == block->live) release_block();
    if (wp.arrived > 0 && wp.arrived == wp.live) release_warp(current->linear / 32);
#if defined(__x86_64__)
    void* dead = nullptr;
    emu_switch(&dead, block->scheduler.sp);
#else
    setcontext(&block->scheduler.uc);
#endif
    die("a finished fiber was resumed");
}

#if defined(__x86_64__)
extern "C" void emu_fiber_entry() { fiber_main(); }
#endif

void start_fiber(Fiber& f, unsigned char* stack) {
#if defined(__x86_64__)
    // Stack image popped by emu_switch: six callee-saved registers, then the return address.
    uintptr_t top = (uintptr_t(stack) + kStackBytes) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 64);
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    sp[6] = reinterpret_cast<void*>(&emu_fiber_entry);
    sp[7] = nullptr;
    f.ctx.sp = sp;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = stack;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_main, 0);
#endif
}

void resume(Fiber& f) {
    current = &f.t;
#if defined(__x86_64__)
    emu_switch(&block->scheduler.sp, f.ctx.sp);
#else
    swapcontext(&block->scheduler.uc, &f.ctx.uc);
#endif
}

/// Runs one block to completion on the calling OS thread.
void run_block(dim3 bid) {
    Block& b = *block;
    size_t n = b.fibers.size();
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    b.live = int(n);
    b.arrived = 0;
    for (int& a : b.named_arrived) a = 0;
    b.tma.clear();
    if (b.dsmem_bytes > 0) std::memset(b.dsmem, 0xA5, b.dsmem_bytes);  // garbage, not zeros
    for (size_t w = 0; w < b.warps.size(); ++w) {
        b.warps[w].live = int(std::min<size_t>(32, n - w * 32));
        b.warps[w].arrived = 0;
        b.warps[w].parity = 0;
    }
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.state = State::Runnable;
        f.spins = 0;
        f.wgmma.clear();
        f.wgmma_groups = 0;
        f.t.block_idx = bid;
        start_fiber(f, b.stacks + i * (kStackBytes + page) + page);
    }
    size_t done = 0;
    while (done < n) {
        bool progressed = false;
        done = 0;
        for (size_t i = 0; i < n; ++i) {
            if (b.fibers[i].state == State::Runnable) {
                resume(b.fibers[i]);
                progressed = true;
            }
            if (b.fibers[i].state == State::Done) ++done;
        }
        if (!progressed && done < n)
            die("deadlock: the block's threads wait at different barriers (divergent "
                "__syncthreads, named barrier or warp collective)");
    }
    current = nullptr;
}

struct Launch {
    void (*invoke)(void**);
    void** args;
    dim3 grid, blockdim;
    size_t shared_bytes = 0;
    std::atomic<unsigned long> next{0};
};

void worker(Launch* l) {
    size_t n = size_t(l->blockdim.x) * l->blockdim.y * l->blockdim.z;
    size_t page = size_t(sysconf(_SC_PAGESIZE));
    Block b;
    b.fibers.resize(n);
    b.warps.resize((n + 31) / 32);
    b.invoke = l->invoke;
    b.args = l->args;
    b.stack_region = n * (kStackBytes + page);
    void* mem = mmap(nullptr, b.stack_region, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) die("cannot map fiber stacks");
    b.stacks = static_cast<unsigned char*>(mem);
    for (size_t i = 0; i < n; ++i) mprotect(b.stacks + i * (kStackBytes + page), page, PROT_NONE);
    std::vector<unsigned char> dsmem(l->shared_bytes + 1024);
    b.dsmem_bytes = l->shared_bytes;
    b.dsmem = reinterpret_cast<unsigned char*>((uintptr_t(dsmem.data()) + 1023) & ~uintptr_t(1023));
    for (size_t i = 0; i < n; ++i) {
        ThreadCtx& t = b.fibers[i].t;
        t.linear = int(i);
        t.thread_idx = {unsigned(i % l->blockdim.x), unsigned(i / l->blockdim.x % l->blockdim.y),
                        unsigned(i / (size_t(l->blockdim.x) * l->blockdim.y))};
        t.block_dim = l->blockdim;
        t.grid_dim = l->grid;
    }
    block = &b;
    unsigned long total = (unsigned long)l->grid.x * l->grid.y * l->grid.z;
    for (;;) {
        unsigned long i = l->next.fetch_add(1);
        if (i >= total) break;
        dim3 bid{unsigned(i % l->grid.x), unsigned(i / l->grid.x % l->grid.y),
                 unsigned(i / ((unsigned long)l->grid.x * l->grid.y))};
        run_block(bid);
    }
    block = nullptr;
    munmap(mem, b.stack_region);
}

unsigned worker_count() {
    if (const char* s = std::getenv("M2UNET_EMU_THREADS")) {
        int v = std::atoi(s);
        if (v > 0) return unsigned(v);
    }
    unsigned hc = std::thread::hardware_concurrency();
    return hc == 0 ? 1 : hc;
}

}  // namespace

void sync_block() {
    Block& b = *block;
    b.arrived += 1;
    if (b.arrived == b.live) {
        release_block();
        return;
    }
    me().state = State::WaitBlock;
    yield_to_scheduler();
}

const unsigned char* warp_allgather(const void* data, size_t bytes) {
    if (bytes > kSlotBytes) die("warp collective payload too large");
    int w = current->linear / 32;
    Warp& wp = block->warps[size_t(w)];
    unsigned char* slots = wp.slots[wp.parity];
    std::memcpy(slots + size_t(current->linear & 31) * kSlotBytes, data, bytes);
    wp.arrived += 1;
    if (wp.arrived == wp.live) {
        wp.parity ^= 1;
        release_warp(w);
    } else {
        me().state = State::WaitWarp;
        yield_to_scheduler();
    }
    return slots;
}


unsigned char* dynamic_smem() { return block->dsmem; }

void spin() {
    Fiber& f = me();
    if (++f.spins > kMaxSpins)
        die("deadlock: an mbarrier wait never completes (a missing arrive, TMA load or "
            "expected byte count)");
    yield_to_scheduler();
}

void sync_named(int id, int count) {
    if (id <= 0 || id >= kNamedBarriers) die("named barrier id out of range");
    Block& b = *block;
    if (++b.named_arrived[id] == count) {
        for (auto& f : b.fibers)
            if (f.state == State::WaitNamed && f.named_id == id) f.state = State::Runnable;
        b.named_arrived[id] = 0;
        return;
    }
    me().state = State::WaitNamed;
    me().named_id = id;
    yield_to_scheduler();
}

namespace {

// The barrier word: bits 0–31 the pending transaction bytes (signed), 32–47 the pending
// arrivals, 48–62 the arrival count, 63 the phase parity.
struct MbarWord {
    int32_t tx;
    unsigned pending, count, phase;
};

MbarWord mbar_load(const uint64_t* bar) {
    uint64_t v = *bar;
    return {int32_t(uint32_t(v)), unsigned(v >> 32) & 0xffffu, unsigned(v >> 48) & 0x7fffu,
            unsigned(v >> 63)};
}

void mbar_store(uint64_t* bar, MbarWord m) {
    if (m.pending == 0 && m.tx == 0) {  // the phase completes
        m.phase ^= 1u;
        m.pending = m.count;
    }
    *bar = uint64_t(uint32_t(m.tx)) | uint64_t(m.pending) << 32 | uint64_t(m.count) << 48 |
           uint64_t(m.phase) << 63;
}

/// Shared-memory address of a pointer into the dynamic shared memory.
uint32_t smem_offset(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < block->dsmem || c >= block->dsmem + block->dsmem_bytes) {
        std::fprintf(stderr, "emulator: offset %td of %zu bytes of dynamic shared memory\n",
                     c - block->dsmem, block->dsmem_bytes);
        die("a TMA, mbarrier or wgmma operand outside the dynamic shared memory");
    }
    return uint32_t(c - block->dsmem);
}

/// The 128-byte swizzle as the hardware applies it to a shared-memory address: the 16-byte
/// chunk (bits 4–6) XOR the 128-byte row within its 1024-byte group (bits 7–9).
uint32_t swizzle128(uint32_t a) { return a ^ (((a >> 7) & 7u) << 4); }

/// Lands a queued TMA load; returns its byte count (the whole box, zero fill included).
size_t tma_execute(const TmaOp& op) {
    const TensorMapDesc& m = op.map;
    size_t total = 1;
    for (unsigned d = 0; d < m.rank; ++d) total *= m.box[d];
    uint32_t base = smem_offset(op.dst);
    if (m.swizzle == 3 && (m.box[0] * m.elem_bytes > 128 || base % 1024 != 0))
        die("TMA 128-byte swizzle needs an inner box of at most 128 bytes and a 1024-byte "
            "aligned destination");
    for (size_t i = 0; i < total; ++i) {
        size_t r = i;
        bool in = true;
        uint64_t src = 0;
        for (unsigned d = 0; d < m.rank; ++d) {
            long c = long(op.coords[d]) + long(r % m.box[d]);
            r /= m.box[d];
            if (c < 0 || c >= long(m.dims[d])) in = false;
            else src += uint64_t(c) * m.strides[d];
        }
        uint32_t at = base + uint32_t(i * m.elem_bytes);
        if (m.swizzle == 3) at = swizzle128(at);
        unsigned char* dst = block->dsmem + at;
        if (in)
            std::memcpy(dst, reinterpret_cast<const unsigned char*>(m.base) + src, m.elem_bytes);
        else
            std::memset(dst, 0, m.elem_bytes);
    }
    return total * m.elem_bytes;
}

/// Element (row, k) of a K-major fp16 operand described by a wgmma shared-memory descriptor
/// with the 128-byte swizzle: 8-row core groups `stride` bytes apart, 128-byte rows.
float wgmma_operand(uint64_t desc, int row, int k) {
    uint32_t start = uint32_t(desc & 0x3fff) << 4;
    uint32_t stride = uint32_t((desc >> 32) & 0x3fff) << 4;
    if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0)
        die("the wgmma twin models K-major operands with the 128-byte swizzle and base offset 0");
    uint32_t a = start + uint32_t(row / 8) * stride + uint32_t(row % 8) * 128 + uint32_t(k) * 2;
    a = swizzle128(a);
    if (a + 2 > block->dsmem_bytes) die("a wgmma operand past the dynamic shared memory");
    __half h;
    std::memcpy(&h, block->dsmem + a, 2);
    return float(h);
}

/// This thread's part of one m64nNk16: accumulator register 4j + i holds row
/// 16·warp + lane/4 + 8·(i/2), column 8j + 2·(lane%4) + i%2 (PTX ISA, wgmma D fragments).
/// The thread's two rows of A and N/4 columns of B are read once, then multiplied.
void wgmma_execute(const WgmmaOp& op) {
    int t = current->linear % 128, w = t / 32, l = t % 32;
    float a[2][16], b[64][16];
    for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 16; ++k) a[h][k] = wgmma_operand(op.desc_a, 16 * w + l / 4 + 8 * h, k);
    for (int j = 0; j < op.n / 8; ++j)
        for (int e = 0; e < 2; ++e)
            for (int k = 0; k < 16; ++k)
                b[2 * j + e][k] = wgmma_operand(op.desc_b, 8 * j + 2 * (l % 4) + e, k);
    for (int j = 0; j < op.n / 8; ++j)
        for (int i = 0; i < 4; ++i) {
            float acc = op.d[4 * j + i];
            for (int k = 0; k < 16; ++k) acc += a[i / 2][k] * b[2 * j + i % 2][k];
            op.d[4 * j + i] = acc;
        }
}

}  // namespace

void mbar_init(uint64_t* bar, unsigned count) {
    smem_offset(bar);
    if (count == 0 || count > 0x7fff) die("mbarrier count out of range");
    *bar = uint64_t(count) << 32 | uint64_t(count) << 48;
}

void mbar_arrive(uint64_t* bar, unsigned tx) {
    MbarWord m = mbar_load(bar);
    if (m.pending == 0) die("mbarrier arrival on a barrier with no pending arrivals");
    m.tx += int32_t(tx);
    m.pending -= 1;
    mbar_store(bar, m);
}

bool mbar_try_wait(uint64_t* bar, unsigned parity) {
    auto& ops = block->tma;
    for (size_t i = 0; i < ops.size();) {
        if (ops[i].bar != bar) {
            ++i;
            continue;
        }
        TmaOp op = ops[i];
        ops.erase(ops.begin() + long(i));
        size_t bytes = tma_execute(op);
        MbarWord m = mbar_load(bar);
        m.tx -= int32_t(bytes);
        mbar_store(bar, m);
    }
    bool done = mbar_load(bar).phase != (parity & 1u);
    if (done) me().spins = 0;
    return done;
}

void tma_load(void* dst, const TensorMapDesc* map, const int* coords, uint64_t* bar) {
    if (map->rank == 0 || map->rank > 5) die("TMA tensor map of bad rank (not encoded?)");
    TmaOp op{static_cast<unsigned char*>(dst), *map, {}, bar};
    for (unsigned d = 0; d < map->rank; ++d) op.coords[d] = coords[d];
    smem_offset(dst);
    smem_offset(bar);
    block->tma.push_back(op);
}

void wgmma_issue(uint64_t desc_a, uint64_t desc_b, float* d, int n) {
    if (n % 8 != 0 || n < 8 || n > 256) die("wgmma N must be a multiple of 8 in 8..256");
    me().wgmma.push_back({desc_a, desc_b, d, n, -1});
}

void wgmma_commit() {
    Fiber& f = me();
    for (auto& op : f.wgmma)
        if (op.group < 0) op.group = f.wgmma_groups;
    f.wgmma_groups += 1;
}

void wgmma_wait(int pending) {
    Fiber& f = me();
    int retire_below = f.wgmma_groups - pending;
    size_t kept = 0;
    for (size_t i = 0; i < f.wgmma.size(); ++i) {
        const WgmmaOp& op = f.wgmma[i];
        if (op.group >= 0 && op.group < retire_below)
            wgmma_execute(op);
        else
            f.wgmma[kept++] = op;
    }
    f.wgmma.resize(kept);
}

}  // namespace emu

extern "C" const emu::KernelEntry* m2unet_emu_registry(size_t* count);

/// Runs kernel `name` over `grid` × `block` with `shared_bytes` of dynamic shared memory and
/// cuLaunchKernel-style `args`; returns 0, or -1 for an unknown kernel, -2 for a block of
/// more than 1024 threads.
extern "C" int m2unet_emu_launch(const char* name, const unsigned* grid, const unsigned* blockdim,
                                 unsigned shared_bytes, void** args) {
    size_t count = 0;
    const emu::KernelEntry* reg = m2unet_emu_registry(&count);
    const emu::KernelEntry* k = nullptr;
    for (size_t i = 0; i < count; ++i)
        if (std::strcmp(reg[i].name, name) == 0) k = &reg[i];
    if (k == nullptr) return -1;
    emu::Launch l;
    l.invoke = k->invoke;
    l.args = args;
    l.grid = {grid[0], grid[1], grid[2]};
    l.blockdim = {blockdim[0], blockdim[1], blockdim[2]};
    l.shared_bytes = shared_bytes;
    size_t threads = size_t(blockdim[0]) * blockdim[1] * blockdim[2];
    if (threads == 0 || threads > size_t(emu::kMaxThreads)) return -2;
    unsigned long blocks = (unsigned long)grid[0] * grid[1] * grid[2];
    if (blocks == 0) return 0;
    unsigned nw = unsigned(std::min<unsigned long>(emu::worker_count(), blocks));
    std::vector<std::thread> pool;
    for (unsigned i = 1; i < nw; ++i) pool.emplace_back(emu::worker, &l);
    emu::worker(&l);
    for (auto& t : pool) t.join();
    return 0;
}

/// Number of worker threads the emulator spreads blocks over.
extern "C" unsigned m2unet_emu_workers() { return emu::worker_count(); }
