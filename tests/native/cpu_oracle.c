/*
 * cpu_oracle.c: run one x86 instruction on the host CPU and report what it did.
 *
 * A differential-test oracle for ptemu. The Python wrapper (cpu_oracle.py)
 * builds this file on first use (a 64-bit helper, and with `gcc -m32` a
 * 32-bit one) and keeps each helper running as a persistent subprocess.
 *
 * Protocol on stdin/stdout (integers little-endian; 64-bit fields in both builds):
 *   hello    helper -> wrapper once at start-up (struct hello)
 *   request  wrapper -> helper: struct req_header, then code_len code bytes,
 *            then npages x { u64 address; u8 data[4096] }
 *   response helper -> wrapper: struct resp_header, then npages x 4096 bytes
 *            (the pages after the run, in request order), then msg_len bytes
 *            of text (only for a setup error)
 *
 * Processes. The helper is a supervisor: it forks one worker and hands it each
 * case through shared memory and two pipes. The worker maps the caller's pages
 * at their fixed addresses, copies the code to its fixed RIP followed by an
 * INT3 sentinel, and loads the whole register state at once through
 * rt_sigreturn: an INT3 traps into a handler that rewrites the signal frame
 * (GPRs, RIP, RFLAGS, XMM/YMM in the XSAVE image) and returns into the
 * instruction. The sentinel INT3, or any fault, traps into the same handler,
 * which runs on an alternate stack, copies the frame and the pages to shared
 * memory and siglongjmps back to the worker's loop. The worker is reused, so a
 * case costs two signals and a few mmaps rather than a fork (several times
 * faster on this VM). If the worker dies, the supervisor reports the case as
 * crashed and starts a new worker; if it hangs, the supervisor sends SIGALRM
 * (reported as a timeout with the registers at that moment).
 *
 * Isolation while the instruction runs, so that random operands can neither
 * harm the machine nor corrupt the worker for later cases:
 *   - seccomp: a system call is allowed only if it is one the worker needs
 *     and comes from code that was mapped executable when the worker started
 *     (its own image and libc, not the vDSO: see oracle_int80); from the
 *     caller's code page, and through any other ABI (int 0x80 in a 64-bit
 *     process), it raises SIGSYS, reported as a fault.
 *   - every writable mapping of the worker except its signal stack is made
 *     read-only just before the instruction and writable again first thing in
 *     the handler, so a store that misses the caller's pages faults instead of
 *     corrupting the worker (reported as SIGSEGV, si_code SEGV_ACCERR).
 *   - FS/GS (selectors and bases) are restored first thing in the handler.
 *
 * Build flags matter: -fno-stack-protector, because the handler starts while
 * FS base may hold the caller's value (64-bit) and must not touch TLS first;
 * -mno-red-zone, because the inline PUSHF/POPF must not clobber locals.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>
#if __has_include(<sys/rseq.h>)
#include <sys/rseq.h>
#define HAVE_RSEQ 1
#endif

#if defined(__x86_64__)
#define ORACLE_BITS 64
#define NVEC 16
#define AUDIT_ARCH_NATIVE AUDIT_ARCH_X86_64
#elif defined(__i386__)
#define ORACLE_BITS 32
#define NVEC 8
#define AUDIT_ARCH_NATIVE AUDIT_ARCH_I386
#else
#error "cpu_oracle runs on x86 only"
#endif

#define STR(x) #x
#define XSTR(x) STR(x)

#define PAGE 4096u
#define MAX_CODE 64u
#define MAX_PAGES 64u
#define NGPR 16
#define VEC_BYTES 32
#define MSG_MAX 256u
#define MAX_REGIONS 64
#define CASE_TIMEOUT_MS 1000
#define ALTSTACK_SIZE (256u * 1024u)

#define MAGIC_HELLO 0x484f5450u /* "PTOH" */
#define MAGIC_REQ 0x514f5450u   /* "PTOQ" */
#define MAGIC_RESP 0x524f5450u  /* "PTOR" */
#define PROTOCOL_VERSION 2u

/* request flags */
#define REQ_SET_FS 0x1u
#define REQ_SET_GS 0x2u
#define REQ_SET_YMM 0x4u

/* hello feature bits */
#define FEAT_AVX 0x1u
#define FEAT_FSGSBASE 0x2u

/* response status */
#define ST_COMPLETED 0u
#define ST_FAULT 1u
#define ST_TIMEOUT 2u
#define ST_SETUP_ERROR 3u
#define ST_CRASHED 4u

/* RFLAGS bits the caller may set: CF PF AF ZF SF DF OF (SDM vol. 1, 3.4.3). */
#define USER_FLAGS 0x0CD5u
#define FLAG_TF 0x100u
#define FLAG_DF 0x400u
#define FLAG_NT 0x4000u
#define FLAG_RF 0x10000u
#define FLAG_AC 0x40000u

/* Offsets in the FXSAVE/XSAVE image (SDM vol. 1, 10.5.1 and 13.4). */
#define FX_MXCSR 24
#define FX_XMM 160
#define FX_SW_BYTES 464 /* Linux: struct _fpx_sw_bytes in the reserved area */
#ifndef FP_XSTATE_MAGIC1
#define FP_XSTATE_MAGIC1 0x46505853u
#endif
#define XSAVE_HEADER 512
#define XFEATURE_SSE 0x2u
#define XFEATURE_YMM 0x4u

struct hello {
    uint32_t magic, version, bits, features;
    uint32_t nvec, max_pages, max_code, ymm_offset;
};

/* GPR order: rax rcx rdx rbx rsp rbp rsi rdi r8..r15 (the encoding order). */
struct req_header {
    uint32_t magic, flags, code_len, npages;
    uint64_t rip, rflags, fs_base, gs_base;
    uint64_t gpr[NGPR];
    uint8_t vec[16][VEC_BYTES];
};

struct resp_header {
    uint32_t magic, status, signo;
    int32_t si_code;
    uint64_t fault_addr, trapno, error_code;
    uint64_t rip, rflags, fs_base, gs_base;
    uint64_t gpr[NGPR];
    uint8_t vec[16][VEC_BYTES];
    uint32_t npages, msg_len;
};

_Static_assert(sizeof(struct hello) == 32, "hello layout");
_Static_assert(sizeof(struct req_header) == 688, "request layout");
_Static_assert(sizeof(struct resp_header) == 720, "response layout");

/* Supervisor <-> worker: one MAP_SHARED mapping made before the fork. */
struct shared_area {
    struct req_header req;
    uint8_t code[MAX_CODE];
    uint64_t addr[MAX_PAGES];
    uint8_t pages_in[MAX_PAGES][PAGE];
    struct resp_header head;
    char msg[MSG_MAX];
    uint8_t pages_out[MAX_PAGES][PAGE];
};

static struct shared_area *shared;
static uint32_t features;
static uint32_t ymm_offset;

/* ---- small helpers ---------------------------------------------------- */

static int read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Raw system calls for the signal handler: no errno (TLS) on any path. */
static long raw_syscall3(long nr, long a, long b, long c)
{
    long ret;
#if defined(__x86_64__)
    __asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
#else
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
#endif
    return ret;
}

static __attribute__((noreturn)) void raw_exit(int code)
{
    raw_syscall3(SYS_exit_group, code, 0, 0);
    for (;;)
        ;
}

#if defined(__x86_64__)
static inline uint64_t rd_fsbase(void) { uint64_t v; __asm__ volatile("rdfsbase %0" : "=r"(v)); return v; }
static inline uint64_t rd_gsbase(void) { uint64_t v; __asm__ volatile("rdgsbase %0" : "=r"(v)); return v; }
static inline void wr_fsbase(uint64_t v) { __asm__ volatile("wrfsbase %0" : : "r"(v) : "memory"); }
static inline void wr_gsbase(uint64_t v) { __asm__ volatile("wrgsbase %0" : : "r"(v) : "memory"); }
#endif
static inline uint16_t rd_fs_sel(void) { uint16_t v; __asm__ volatile("mov %%fs, %0" : "=r"(v)); return v; }
static inline uint16_t rd_gs_sel(void) { uint16_t v; __asm__ volatile("mov %%gs, %0" : "=r"(v)); return v; }
static inline void wr_fs_sel(uint16_t v) { __asm__ volatile("mov %0, %%fs" : : "r"(v)); }
static inline void wr_gs_sel(uint16_t v) { __asm__ volatile("mov %0, %%gs" : : "r"(v)); }

#if defined(__i386__)
/* glibc's i386 system calls go through `call *%gs:0x10`, the vDSO's
   __kernel_vsyscall (SYSENTER or SYSCALL). The kernel reports every such call
   at the vDSO's landing pad, the very address it also reports for a SYSENTER
   or SYSCALL executed by the caller's instruction, so the seccomp filter could
   not tell the two apart. Route glibc through this INT 0x80 in our own text
   instead (INT 0x80 reports its real address), and do not trust the vDSO. */
__asm__(".text\n"
        ".type oracle_int80, @function\n"
        "oracle_int80:\n"
        "\tint $0x80\n"
        "\tret\n"
        ".size oracle_int80, .-oracle_int80\n"
        /* The signal return trampoline, for the same reason: glibc leaves the
           i386 restorer to the vDSO's __kernel_rt_sigreturn. */
        ".type oracle_rt_sigreturn, @function\n"
        "oracle_rt_sigreturn:\n"
        "\tmovl $" XSTR(SYS_rt_sigreturn) ", %eax\n"
        "\tint $0x80\n"
        ".size oracle_rt_sigreturn, .-oracle_rt_sigreturn\n");
extern char oracle_int80[];
extern char oracle_rt_sigreturn[];

/* The kernel's struct sigaction for rt_sigaction on i386. */
struct kernel_sigaction {
    void (*handler)(int, siginfo_t *, void *);
    unsigned long flags;
    void (*restorer)(void);
    uint64_t mask;
};
#define SA_RESTORER_ 0x04000000u
#endif

/* ---- worker state ----------------------------------------------------- */

enum phase { PHASE_IDLE, PHASE_LOADING, PHASE_RUNNING };

struct region {
    uintptr_t start, end;
    int prot;
};

static volatile int phase = PHASE_IDLE;
static sigjmp_buf case_jmp;
static struct req_header wreq;    /* private copy: the instruction cannot change it */
static uint64_t waddr[MAX_PAGES];
static uintptr_t sentinel;
static uintptr_t code_lo, code_hi; /* the code mapping of the current case, or 0 */
static uint32_t pages_mapped;
static uint8_t *altstack;
static struct region guarded[MAX_REGIONS]; /* writable mappings made read-only per case */
static int n_guarded;
static struct region exec_ranges[MAX_REGIONS]; /* where system calls may come from */
static uintptr_t rseq_lo, rseq_hi; /* pages left unguarded for a registered rseq area */
static int n_exec;
static uint16_t host_fs_sel, host_gs_sel;
#if defined(__x86_64__)
static uint64_t host_fs_base, host_gs_base;
#endif

static void guard_memory(int on)
{
    for (int i = 0; i < n_guarded; i++)
        raw_syscall3(SYS_mprotect, (long)guarded[i].start,
                     (long)(guarded[i].end - guarded[i].start),
                     on ? PROT_READ : guarded[i].prot);
}

/* Ends the current case with a setup error (never while memory is guarded). */
static __attribute__((noreturn)) void setup_error(const char *msg)
{
    size_t n = strlen(msg);
    if (n >= MSG_MAX)
        n = MSG_MAX - 1;
    memcpy(shared->msg, msg, n);
    shared->head.msg_len = (uint32_t)n;
    shared->head.status = ST_SETUP_ERROR;
    phase = PHASE_IDLE;
    siglongjmp(case_jmp, 1);
}

/* ---- register state <-> signal frame ---------------------------------- */

#if defined(__x86_64__)
static const int gpr_index[] = {
    REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI,
    REG_R8, REG_R9, REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15,
};
#define REG_PC REG_RIP
#else
/* sigcontext_32: REG_ESP is the `sp` that sigreturn loads (REG_UESP is not). */
static const int gpr_index[] = {
    REG_EAX, REG_ECX, REG_EDX, REG_EBX, REG_ESP, REG_EBP, REG_ESI, REG_EDI,
};
#define REG_PC REG_EIP
#endif
#define N_FRAME_GPR ((int)(sizeof gpr_index / sizeof gpr_index[0]))
#define GREG(uc, i) ((uc)->uc_mcontext.gregs[i])

/* The FXSAVE image inside the signal frame, or NULL if the frame has none. */
static uint8_t *frame_fxsave(ucontext_t *uc)
{
    uint8_t *fp = (uint8_t *)uc->uc_mcontext.fpregs;
    if (!fp)
        return NULL;
#if defined(__x86_64__)
    return fp;
#else
    /* i386 frames start with the FSAVE image (112 bytes); magic 0 at offset
       110 means the FXSAVE image follows it (Linux struct _fpstate_32). */
    uint16_t magic;
    memcpy(&magic, fp + 110, 2);
    return magic == 0 ? fp + 112 : NULL;
#endif
}

/* XSTATE_BV of the frame's XSAVE header, or NULL if the frame has no XSAVE. */
static uint64_t *frame_xstate_bv(uint8_t *fx, uint64_t *xfeatures)
{
    uint32_t magic1;
    memcpy(&magic1, fx + FX_SW_BYTES, 4);
    if (magic1 != FP_XSTATE_MAGIC1)
        return NULL;
    memcpy(xfeatures, fx + FX_SW_BYTES + 8, 8);
    return (uint64_t *)(void *)(fx + XSAVE_HEADER);
}

static void load_frame(ucontext_t *uc)
{
    for (int i = 0; i < N_FRAME_GPR; i++)
        GREG(uc, gpr_index[i]) = (greg_t)wreq.gpr[i];
    GREG(uc, REG_PC) = (greg_t)wreq.rip;
    greg_t fl = GREG(uc, REG_EFL);
    fl &= ~(greg_t)(USER_FLAGS | FLAG_TF | FLAG_AC | FLAG_RF | FLAG_NT);
    fl |= (greg_t)(wreq.rflags & USER_FLAGS);
    GREG(uc, REG_EFL) = fl;

    uint8_t *fx = frame_fxsave(uc);
    if (!fx)
        setup_error("signal frame has no FXSAVE image: cannot load XMM registers");
    uint32_t mxcsr = 0x1f80; /* the reset value: all exceptions masked */
    memcpy(fx + FX_MXCSR, &mxcsr, 4);
    for (int i = 0; i < NVEC; i++)
        memcpy(fx + FX_XMM + 16 * i, wreq.vec[i], 16);
    uint64_t xfeatures = 0;
    uint64_t *bv = frame_xstate_bv(fx, &xfeatures);
    if (bv) {
        /* XRSTOR loads a component only if its XSTATE_BV bit is set;
           otherwise it puts the component in its init state (all zero). */
        *bv |= XFEATURE_SSE;
        if ((xfeatures & XFEATURE_YMM) && ymm_offset) {
            *bv |= XFEATURE_YMM;
            for (int i = 0; i < NVEC; i++)
                memcpy(fx + ymm_offset + 16 * i, wreq.vec[i] + 16, 16);
        } else if (wreq.flags & REQ_SET_YMM) {
            setup_error("YMM requested but the signal frame has no AVX state");
        }
    } else if (wreq.flags & REQ_SET_YMM) {
        setup_error("YMM requested but the signal frame has no XSAVE area");
    }
}

static void capture_frame(ucontext_t *uc, struct resp_header *out)
{
    for (int i = 0; i < N_FRAME_GPR; i++)
        out->gpr[i] = (uint64_t)(uintptr_t)GREG(uc, gpr_index[i]);
    out->rip = (uint64_t)(uintptr_t)GREG(uc, REG_PC);
    out->rflags = (uint64_t)(uintptr_t)GREG(uc, REG_EFL);
    out->trapno = (uint64_t)(uintptr_t)GREG(uc, REG_TRAPNO);
    out->error_code = (uint64_t)(uintptr_t)GREG(uc, REG_ERR);
    memset(out->vec, 0, sizeof out->vec);
    uint8_t *fx = frame_fxsave(uc);
    if (!fx)
        return;
    uint64_t xfeatures = 0;
    uint64_t *bv = frame_xstate_bv(fx, &xfeatures);
    /* XSAVE does not write a component in its init state (zero) and clears
       its XSTATE_BV bit, so read only what the header says is there. */
    if (!bv || (*bv & XFEATURE_SSE))
        for (int i = 0; i < NVEC; i++)
            memcpy(out->vec[i], fx + FX_XMM + 16 * i, 16);
    if (bv && (*bv & XFEATURE_YMM) && ymm_offset)
        for (int i = 0; i < NVEC; i++)
            memcpy(out->vec[i] + 16, fx + ymm_offset + 16 * i, 16);
}

/* ---- the signal handler ----------------------------------------------- */

static void on_signal(int sig, siginfo_t *si, void *ctx)
{
    ucontext_t *uc = ctx;
    /* The kernel clears DF, TF and RF for a handler but not AC, which POPF
       can set: with AC=1 any misaligned access in here would raise #AC. */
#if defined(__x86_64__)
    __asm__ volatile("pushfq; andq %0, (%%rsp); popfq" : : "i"(~(long)FLAG_AC) : "memory", "cc");
#else
    __asm__ volatile("pushfl; andl %0, (%%esp); popfl" : : "i"(~(long)FLAG_AC) : "memory", "cc");
#endif
    /* Then give the C runtime its TLS back (the instruction may have
       changed the selectors or, with FSGSBASE, the bases). */
    if (rd_fs_sel() != host_fs_sel)
        wr_fs_sel(host_fs_sel);
    if (rd_gs_sel() != host_gs_sel)
        wr_gs_sel(host_gs_sel);
#if defined(__x86_64__)
    uint64_t cur_fs = 0, cur_gs = 0;
    if (features & FEAT_FSGSBASE) {
        cur_fs = rd_fsbase();
        cur_gs = rd_gsbase();
        wr_fsbase(host_fs_base);
        wr_gsbase(host_gs_base);
    }
#endif
    if (phase == PHASE_RUNNING)
        guard_memory(0);

    if (phase == PHASE_LOADING) {
        if (sig != SIGTRAP)
            setup_error("unexpected signal while loading the register state");
        load_frame(uc);
        phase = PHASE_RUNNING;
        guard_memory(1); /* from here until the next signal, no stores outside the altstack */
#if defined(__x86_64__)
        /* Last thing before sigreturn: nothing may use TLS after this. */
        if (wreq.flags & REQ_SET_FS)
            wr_fsbase(wreq.fs_base);
        if (wreq.flags & REQ_SET_GS)
            wr_gsbase(wreq.gs_base);
#endif
        return;
    }
    if (phase != PHASE_RUNNING) {
        if (sig == SIGALRM)
            return; /* a timeout that raced with the end of the case */
        raw_exit(100 + sig); /* a fault in the worker itself: the supervisor restarts it */
    }

    struct resp_header *out = &shared->head;
    capture_frame(uc, out);
#if defined(__x86_64__)
    out->fs_base = cur_fs;
    out->gs_base = cur_gs;
#endif
    if (sig == SIGTRAP && out->rip == (uint64_t)sentinel + 1) {
        out->status = ST_COMPLETED;
        out->rip = sentinel;
        out->trapno = 0;
        out->error_code = 0;
    } else if (sig == SIGALRM) {
        out->status = ST_TIMEOUT;
        out->signo = (uint32_t)sig;
    } else {
        out->status = ST_FAULT;
        out->signo = (uint32_t)sig;
        out->si_code = si->si_code;
        out->fault_addr = (uint64_t)(uintptr_t)si->si_addr;
        if (sig == SIGSYS)
            out->fault_addr = (uint64_t)(uint32_t)si->si_syscall;
    }
    for (uint32_t i = 0; i < wreq.npages; i++)
        memcpy(shared->pages_out[i], (void *)(uintptr_t)waddr[i], PAGE);
    phase = PHASE_IDLE; /* before the mask is restored: a late SIGALRM is ignored */
    siglongjmp(case_jmp, 1);
}

/* ---- worker set-up ---------------------------------------------------- */

/* glibc registers an rseq area in the thread control block, and the kernel
   writes it on returns to user space and on signal delivery: if the guard
   made it read-only, the kernel would kill the worker. Unregister it (the
   wrapper also sets GLIBC_TUNABLES=glibc.pthread.rseq=0); if that fails,
   leave its pages writable. */
static void drop_rseq(void)
{
#ifdef HAVE_RSEQ
    if (__rseq_size == 0)
        return;
    uintptr_t tp;
#if defined(__x86_64__)
    __asm__("mov %%fs:0, %0" : "=r"(tp));
#else
    __asm__("mov %%gs:0, %0" : "=r"(tp));
#endif
    uintptr_t area = tp + (uintptr_t)__rseq_offset;
    const unsigned lens[] = {32, __rseq_size}; /* glibc registers 32 bytes */
    for (size_t i = 0; i < 2; i++)
        if (syscall(SYS_rseq, area, lens[i], 1 /* RSEQ_FLAG_UNREGISTER */, RSEQ_SIG) == 0)
            return;
    rseq_lo = area & ~(uintptr_t)(PAGE - 1);
    rseq_hi = (area + 32 + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
#endif
}

static void add_guarded(uintptr_t start, uintptr_t end, int prot)
{
    if (rseq_lo < end && start < rseq_hi) { /* split around the rseq pages */
        if (start < rseq_lo)
            add_guarded(start, rseq_lo, prot);
        if (rseq_hi < end)
            add_guarded(rseq_hi, end, prot);
        return;
    }
    if (n_guarded == MAX_REGIONS) {
        fprintf(stderr, "cpu_oracle: too many writable mappings\n");
        exit(1);
    }
    guarded[n_guarded++] = (struct region){start, end, prot};
}

/* Reads /proc/self/maps: writable mappings to guard, executable ones to trust. */
static void scan_mappings(void)
{
    static char buf[64 * 1024];
    int fd = open("/proc/self/maps", O_RDONLY);
    if (fd < 0) {
        perror("cpu_oracle: /proc/self/maps");
        exit(1);
    }
    size_t len = 0;
    ssize_t n;
    while (len < sizeof buf - 1 && (n = read(fd, buf + len, sizeof buf - 1 - len)) > 0)
        len += (size_t)n;
    close(fd);
    buf[len] = 0;
    for (char *line = buf; line && *line;) {
        char *next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        char *p = line;
        uintptr_t start = (uintptr_t)strtoull(p, &p, 16);
        uintptr_t end = (uintptr_t)strtoull(p + 1, &p, 16);
        const char *perms = p + 1;
        const char *name = strchr(line, '[');
        /* [vdso] is not trusted: see oracle_int80. Nothing of ours calls from it. */
        int special = name && (strncmp(name, "[vvar", 5) == 0 || strncmp(name, "[vsyscall]", 10) == 0 ||
                               strncmp(name, "[vdso]", 6) == 0);
        int prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
                   (perms[2] == 'x' ? PROT_EXEC : 0);
        if (!special && (prot & PROT_WRITE) && start != (uintptr_t)altstack)
            add_guarded(start, end, prot);
        if (!special && (prot & PROT_EXEC)) {
            /* The seccomp filter compares 32-bit halves: split at 4 GiB lines. */
            while (start < end) {
                uintptr_t stop = end;
#if defined(__x86_64__)
                uintptr_t line4g = (start | 0xffffffffull) + 1;
                if (line4g && line4g < end)
                    stop = line4g;
#endif
                if (n_exec == MAX_REGIONS) {
                    fprintf(stderr, "cpu_oracle: too many executable mappings\n");
                    exit(1);
                }
                exec_ranges[n_exec++] = (struct region){start, stop, prot};
                start = stop;
            }
        }
        line = next;
    }
}

static void install_seccomp(void)
{
    /* What the worker itself calls after set-up (a bug shows up as a crash). */
    static const uint32_t allowed[] = {
        SYS_read, SYS_write, SYS_munmap, SYS_mprotect, SYS_rt_sigprocmask,
        SYS_rt_sigreturn, SYS_exit, SYS_exit_group,
#if defined(__x86_64__)
        SYS_mmap,
#else
        SYS_mmap2, SYS_sigreturn,
#endif
    };
    enum { BLOCK = 5, N_ALLOWED = sizeof allowed / sizeof allowed[0] };
    static struct sock_filter filter[3 + BLOCK * MAX_REGIONS + 2 + N_ALLOWED + 2];
    const uint32_t ip_lo = offsetof(struct seccomp_data, instruction_pointer);
    const uint32_t ip_hi = ip_lo + 4;
    const size_t untrusted = 3 + (size_t)BLOCK * (size_t)n_exec; /* RET TRAP */
    const size_t nr_check = untrusted + 1;
    const size_t allow = nr_check + 1 + N_ALLOWED + 1;
    if (nr_check - 3 > 255) {
        fprintf(stderr, "cpu_oracle: too many executable mappings for the seccomp filter\n");
        exit(1);
    }
    size_t n = 0;
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                               offsetof(struct seccomp_data, arch));
    filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_NATIVE, 1, 0);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP);
    for (int i = 0; i < n_exec; i++) {
        /* ip in [lo, last]; scan_mappings keeps both in one 4 GiB window */
        uint64_t lo = exec_ranges[i].start, last = exec_ranges[i].end - 1;
        size_t next_block = n + BLOCK;
        filter[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ip_hi);
        filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K,
                                                   (uint32_t)(lo >> 32), 0, 3);
        filter[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ip_lo);
        filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, (uint32_t)lo, 0, 1);
        filter[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, (uint32_t)last, 0,
                                                   (uint8_t)(nr_check - next_block));
    }
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                               offsetof(struct seccomp_data, nr));
    for (size_t k = 0; k < N_ALLOWED; k++, n++)
        filter[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, allowed[k],
                                                 (uint8_t)(allow - (n + 1)), 0);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP);
    filter[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    if (n - 1 != allow) {
        fprintf(stderr, "cpu_oracle: seccomp filter layout error\n");
        exit(1);
    }
    struct sock_fprog prog = {(unsigned short)n, filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) {
        perror("cpu_oracle: cannot install the seccomp sandbox");
        exit(1);
    }
}

static void worker_setup(void)
{
    altstack = mmap(NULL, ALTSTACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                    -1, 0);
    if (altstack == MAP_FAILED) {
        perror("cpu_oracle: mmap altstack");
        exit(1);
    }
    stack_t ss = {.ss_sp = altstack, .ss_size = ALTSTACK_SIZE, .ss_flags = 0};
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigfillset(&sa.sa_mask);
    static const int sigs[] = {SIGTRAP, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS, SIGALRM};
    if (sigaltstack(&ss, NULL) != 0) {
        perror("cpu_oracle: sigaltstack");
        exit(1);
    }
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
#if defined(__i386__)
        struct kernel_sigaction ka = {on_signal, SA_SIGINFO | SA_ONSTACK | SA_RESTORER_,
                                      (void (*)(void))(void *)oracle_rt_sigreturn, ~0ull};
        int failed = syscall(SYS_rt_sigaction, sigs[i], &ka, NULL, sizeof ka.mask) != 0;
#else
        int failed = sigaction(sigs[i], &sa, NULL) != 0;
#endif
        if (failed) {
            perror("cpu_oracle: sigaction");
            exit(1);
        }
    }
    host_fs_sel = rd_fs_sel();
    host_gs_sel = rd_gs_sel();
#if defined(__x86_64__)
    if (features & FEAT_FSGSBASE) {
        host_fs_base = rd_fsbase();
        host_gs_base = rd_gsbase();
    }
#endif
    drop_rseq();
#if defined(__i386__)
    __asm__ volatile("movl %0, %%gs:0x10" : : "r"(oracle_int80) : "memory");
#endif
    scan_mappings();
    install_seccomp();
}

/* ---- one case --------------------------------------------------------- */

static void map_fixed(uintptr_t addr, size_t len, const char *what)
{
    char msg[MSG_MAX];
    void *p = mmap((void *)addr, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (p != MAP_FAILED && (uintptr_t)p != addr)
        munmap(p, len);
    if (p == MAP_FAILED || (uintptr_t)p != addr) {
        snprintf(msg, sizeof msg, "%s page %#llx: mmap failed: %s", what,
                 (unsigned long long)addr,
                 p == MAP_FAILED ? (errno == EEXIST ? "address in use by the oracle itself"
                                                    : strerror(errno))
                                 : "kernel ignored MAP_FIXED_NOREPLACE");
        setup_error(msg);
    }
}

static void prepare_case(void)
{
    char msg[MSG_MAX];
    uintptr_t lo = (uintptr_t)wreq.rip & ~(uintptr_t)(PAGE - 1);
    uintptr_t hi = ((uintptr_t)wreq.rip + wreq.code_len + 1 + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
    for (uint32_t i = 0; i < wreq.npages; i++) {
        if (waddr[i] >= lo && waddr[i] < hi) {
            snprintf(msg, sizeof msg, "data page %#llx overlaps the code page(s) of rip %#llx",
                     (unsigned long long)waddr[i], (unsigned long long)wreq.rip);
            setup_error(msg);
        }
        map_fixed((uintptr_t)waddr[i], PAGE, "data");
        pages_mapped = i + 1;
        memcpy((void *)(uintptr_t)waddr[i], shared->pages_in[i], PAGE);
    }
    map_fixed(lo, hi - lo, "code");
    code_lo = lo;
    code_hi = hi;
    memcpy((void *)(uintptr_t)wreq.rip, shared->code, wreq.code_len);
    sentinel = (uintptr_t)wreq.rip + wreq.code_len;
    *(volatile uint8_t *)sentinel = 0xCC; /* INT3 */
    if (mprotect((void *)lo, hi - lo, PROT_READ | PROT_EXEC) != 0)
        setup_error("mprotect of the code page failed");
}

static void finish_case(void)
{
    for (uint32_t i = 0; i < pages_mapped; i++)
        munmap((void *)(uintptr_t)waddr[i], PAGE);
    pages_mapped = 0;
    if (code_lo)
        munmap((void *)code_lo, code_hi - code_lo);
    code_lo = code_hi = 0;
    /* The instruction may have left AC (alignment checks) or NT set in
       RFLAGS; the kernel clears only DF, TF and RF for the handler. */
#if defined(__x86_64__)
    __asm__ volatile("pushfq; andq %0, (%%rsp); popfq" : : "i"(~(long)(FLAG_AC | FLAG_NT | FLAG_DF))
                     : "memory", "cc");
#else
    __asm__ volatile("pushfl; andl %0, (%%esp); popfl" : : "i"(~(long)(FLAG_AC | FLAG_NT | FLAG_DF))
                     : "memory", "cc");
#endif
}

static void run_case(void)
{
    memset(&shared->head, 0, sizeof shared->head);
    wreq = shared->req;
    memcpy(waddr, shared->addr, sizeof waddr);
    if (sigsetjmp(case_jmp, 1) == 0) {
        prepare_case();
        phase = PHASE_LOADING;
        __asm__ volatile("int3" ::: "memory"); /* on_signal loads the state and jumps to rip */
        setup_error("returned from the loading trap");
    }
    phase = PHASE_IDLE;
    finish_case();
}

static __attribute__((noreturn)) void worker_main(int go_fd, int done_fd)
{
    worker_setup();
    uint8_t token = 0;
    if (write_full(done_fd, &token, 1) != 0) /* ready */
        exit(1);
    for (;;) {
        if (read_full(go_fd, &token, 1) != 0)
            exit(0);
        run_case();
        if (write_full(done_fd, &token, 1) != 0)
            exit(1);
    }
}

/* ---- the supervisor --------------------------------------------------- */

static pid_t worker_pid = -1;
static int go_w = -1, done_r = -1;

static void detect_features(void)
{
    unsigned a, b, c, d;
    features = 0;
    ymm_offset = 0;
    if (__get_cpuid(1, &a, &b, &c, &d) && (c & bit_OSXSAVE) && (c & bit_AVX)) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        if ((lo & 0x6) == 0x6) {
            features |= FEAT_AVX;
            /* CPUID.(EAX=0DH,ECX=2):EBX = offset of the YMM_Hi128 component
               in the standard XSAVE format (SDM vol. 1, 13.4.3). */
            __cpuid_count(0xD, 2, a, b, c, d);
            ymm_offset = b;
        }
    }
#if defined(__x86_64__)
    /* Linux sets HWCAP2_FSGSBASE (bit 1) when it enabled CR4.FSGSBASE. */
    if (getauxval(AT_HWCAP2) & 0x2)
        features |= FEAT_FSGSBASE;
#endif
}

static void reap_worker(int kill_it, int *wstatus)
{
    if (worker_pid < 0)
        return;
    if (kill_it)
        kill(worker_pid, SIGKILL);
    while (waitpid(worker_pid, wstatus, 0) < 0 && errno == EINTR)
        ;
    close(go_w);
    close(done_r);
    worker_pid = -1;
}

static void spawn_worker(void)
{
    int go[2], done[2];
    if (pipe2(go, O_CLOEXEC) != 0 || pipe2(done, O_CLOEXEC) != 0) {
        perror("cpu_oracle: pipe");
        exit(1);
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("cpu_oracle: fork");
        exit(1);
    }
    if (pid == 0) {
        close(go[1]);
        close(done[0]);
        close(0); /* only the supervisor talks to the wrapper */
        worker_main(go[0], done[1]);
    }
    close(go[0]);
    close(done[1]);
    worker_pid = pid;
    go_w = go[1];
    done_r = done[0];
    uint8_t token;
    if (read_full(done_r, &token, 1) != 0) {
        fprintf(stderr, "cpu_oracle: the worker failed to start\n");
        exit(1);
    }
}

/* Waits for the worker's token; 0 on success, -1 on timeout, -2 if it died. */
static int wait_done(int timeout_ms)
{
    struct pollfd pfd = {.fd = done_r, .events = POLLIN};
    for (;;) {
        int r = poll(&pfd, 1, timeout_ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0)
            return -1;
        uint8_t token;
        return read_full(done_r, &token, 1) == 0 ? 0 : -2;
    }
}

static const char *check_request(void)
{
    struct req_header *r = &shared->req;
    if ((r->flags & REQ_SET_YMM) && !(features & FEAT_AVX))
        return "YMM upper halves given but the host has no AVX";
    if ((r->flags & (REQ_SET_FS | REQ_SET_GS)) && !(features & FEAT_FSGSBASE))
        return "fs_base/gs_base given but this helper cannot set segment bases";
#if defined(__i386__)
    if (r->rip > 0xffffffffull - MAX_CODE)
        return "rip does not fit a 32-bit address space";
    for (uint32_t i = 0; i < r->npages; i++)
        if (shared->addr[i] > 0xffffffffull - PAGE)
            return "page address does not fit a 32-bit address space";
#endif
    for (uint32_t i = 0; i < r->npages; i++)
        if (shared->addr[i] & (PAGE - 1))
            return "page address not page-aligned";
    return NULL;
}

static void run_in_worker(void)
{
    int ws = 0;
    if (worker_pid > 0 && waitpid(worker_pid, &ws, WNOHANG) == worker_pid) {
        close(go_w); /* it died between cases (killed from outside): start afresh */
        close(done_r);
        worker_pid = -1;
    }
    if (worker_pid < 0)
        spawn_worker();
    uint8_t token = 0;
    int r = write_full(go_w, &token, 1) == 0 ? wait_done(CASE_TIMEOUT_MS) : -2;
    if (r == -1) {
        kill(worker_pid, SIGALRM); /* the handler reports a timeout with the registers */
        r = wait_done(CASE_TIMEOUT_MS);
        if (r == 0) {
            /* Start the next case in a new worker: the SIGALRM must not reach it. */
            reap_worker(1, &ws);
            return;
        }
    }
    if (r == 0)
        return;
    reap_worker(1, &ws);
    memset(&shared->head, 0, sizeof shared->head);
    shared->head.status = ST_CRASHED;
    shared->head.signo = WIFSIGNALED(ws) ? (uint32_t)WTERMSIG(ws) : 0;
    shared->head.si_code = WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    detect_features();
    shared = mmap(NULL, sizeof *shared, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared == MAP_FAILED) {
        perror("cpu_oracle: mmap");
        return 1;
    }
    struct hello h = {MAGIC_HELLO, PROTOCOL_VERSION, ORACLE_BITS, features,
                      NVEC, MAX_PAGES, MAX_CODE, ymm_offset};
    if (write_full(1, &h, sizeof h) != 0)
        return 1;
    struct req_header *req = &shared->req;
    for (;;) {
        if (read_full(0, req, sizeof *req) != 0)
            break; /* the wrapper closed the pipe */
        if (req->magic != MAGIC_REQ || req->code_len == 0 || req->code_len > MAX_CODE ||
            req->npages > MAX_PAGES) {
            fprintf(stderr, "cpu_oracle: malformed request header\n");
            return 1;
        }
        if (read_full(0, shared->code, req->code_len) != 0)
            return 1;
        for (uint32_t i = 0; i < req->npages; i++)
            if (read_full(0, &shared->addr[i], 8) != 0 ||
                read_full(0, shared->pages_in[i], PAGE) != 0)
                return 1;

        const char *bad = check_request();
        if (bad) {
            memset(&shared->head, 0, sizeof shared->head);
            size_t n = strlen(bad);
            memcpy(shared->msg, bad, n);
            shared->head.msg_len = (uint32_t)n;
            shared->head.status = ST_SETUP_ERROR;
        } else {
            run_in_worker();
        }
        struct resp_header *out = &shared->head;
        out->magic = MAGIC_RESP;
        uint32_t npages = out->status <= ST_TIMEOUT ? req->npages : 0;
        out->npages = npages;
        if (out->status != ST_SETUP_ERROR)
            out->msg_len = 0;
        if (write_full(1, out, sizeof *out) != 0)
            return 1;
        for (uint32_t i = 0; i < npages; i++)
            if (write_full(1, shared->pages_out[i], PAGE) != 0)
                return 1;
        if (out->msg_len && write_full(1, shared->msg, out->msg_len) != 0)
            return 1;
    }
    int ws;
    reap_worker(1, &ws);
    return 0;
}
