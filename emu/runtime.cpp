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

enum class State { Runnable, WaitBlock, WaitWarp, Done };

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

struct Fiber {
    Context ctx;
    ThreadCtx t;
    State state = State::Runnable;
};

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
    for (size_t w = 0; w < b.warps.size(); ++w) {
        b.warps[w].live = int(std::min<size_t>(32, n - w * 32));
        b.warps[w].arrived = 0;
        b.warps[w].parity = 0;
    }
    for (size_t i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.state = State::Runnable;
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
                "__syncthreads or warp collective)");
    }
    current = nullptr;
}

struct Launch {
    void (*invoke)(void**);
    void** args;
    dim3 grid, blockdim;
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

}  // namespace emu

extern "C" const emu::KernelEntry* m2unet_emu_registry(size_t* count);

/// Runs kernel `name` over `grid` × `block` with cuLaunchKernel-style `args`; returns 0, or
/// -1 for an unknown kernel, -2 for a block of more than 1024 threads.
extern "C" int m2unet_emu_launch(const char* name, const unsigned* grid, const unsigned* blockdim,
                                 void** args) {
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
