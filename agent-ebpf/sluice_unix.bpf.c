// SPDX-License-Identifier: GPL-2.0
/* sluice_unix.bpf.c: steer every unix-socket connect() to a protected database socket into an
 * agent listener (the unix counterpart of sluice.bpf.c's connect4/connect6).
 *
 * API (agent/src/intercept/unix.rs loads this object with libbpf: aya 0.14 knows neither the
 * section nor kfunc calls):
 *   sluice_connect_unix  cgroup/connect_unix  (kernel 6.7+) rewrite a protected path to the
 *                                             target's agent listener, save the record
 *
 * Maps: `unix_targets` (path -> target; only userspace writes), `unix_exempt`
 * (cgroup ids never redirected), `unix_knobs` (one entry: the exempt SO_MARK), `unix_conns`
 * (client socket inode -> record; the agent finds the inode of its accepted connection's peer
 * with sock_diag), `unix_counters` (per-CPU, enum sluice_unix_counter).
 *
 * Invariants:
 *   - The hook sees the name the caller passed, before the kernel resolves it: other names for
 *     the same socket (symlinks, relative paths, hard links, bind mounts) are not matched here.
 *     The agent closes those by requiring the real socket to be reachable only by its owner
 *     (checked at start, see unix.rs); this program only has to match exact names.
 *   - A protected connect is never left untouched unless it is exempt: if saving the record
 *     fails it is redirected anyway (the agent then refuses it), and if the rewrite itself
 *     fails the connect is refused (EPERM). Fail closed, as for TCP.
 *   - Identity is captured here, where `current` is the caller of connect().
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "sluice_unix.h"

#define SOCK_STREAM 1
#define SUN_PATH_OFFSET 2 /* offsetof(struct sockaddr_un, sun_path) */

/* Return codes of cgroup sock_addr programs. */
#define SLUICE_ALLOW 1
#define SLUICE_DENY 0

char LICENSE[] SEC("license") = "GPL";

/* Kernel types this program reads, relocated by libbpf against the running kernel's BTF
 * (Debian's 6.1 headers have none of the unix hook's types). Only the fields used. */
struct sock {
	struct socket *sk_socket;
} __attribute__((preserve_access_index));

struct socket {
	short type;
} __attribute__((preserve_access_index));

struct inode {
	unsigned long i_ino;
} __attribute__((preserve_access_index));

/* A socket's inode is allocated with it: sock_alloc_inode() returns &socket_alloc.vfs_inode. */
struct socket_alloc {
	struct socket socket;
	struct inode vfs_inode;
} __attribute__((preserve_access_index));

struct bpf_sock_addr_kern {
	struct sock *sk;
	struct sockaddr *uaddr;
	__u32 uaddrlen;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;
extern int bpf_sock_addr_set_sun_path(struct bpf_sock_addr_kern *sa_kern, const __u8 *sun_path,
				      __u32 sun_path__sz) __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	/* Only userspace writes targets, but not BPF_F_RDONLY_PROG: the verifier checks the
	 * kfunc's sun_path as writable memory ("write into map forbidden, value_size=116 off=8
	 * size=108" at bpf_sock_addr_set_sun_path). */
	__type(key, struct unix_path);
	__type(value, struct unix_target);
} unix_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_RDONLY_PROG);
	__type(key, __u64);
	__type(value, __u8);
} unix_exempt SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_RDONLY_PROG);
	__type(key, __u32);
	__type(value, struct unix_knobs);
} unix_knobs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* inode number of the client's socket */
	__type(value, struct unix_record);
} unix_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SLUICE_UNIX_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} unix_counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&unix_counters, &which);

	/* "R0 invalid mem access 'map_value_or_null'" without the check. */
	if (c)
		*c += 1; /* per-CPU slot: no other writer */
}

/* The name the caller asked for, in the form of struct unix_path (`p` is zeroed by the
 * caller): addrlen minus the family field gives n bytes of sun_path. Returns 0 when there is
 * no name (autobind). No loop over the bytes: a data-dependent loop of 108 steps makes the
 * verifier explore too many states (it never finished); the helpers do the scanning. */
static __always_inline int read_path(struct bpf_sock_addr_kern *sa, struct unix_path *p)
{
	__u32 addrlen = sa->uaddrlen;
	void *src = (void *)sa->uaddr + SUN_PATH_OFFSET;
	__u8 first = 0;
	__u32 n;
	long got;

	if (addrlen <= SUN_PATH_OFFSET)
		return 0;
	n = addrlen - SUN_PATH_OFFSET;
	if (n > SLUICE_UNIX_PATH_MAX)
		n = SLUICE_UNIX_PATH_MAX;
	if (n == 0 || bpf_probe_read_kernel(&first, 1, src))
		return 0;
	if (first == 0) {
		/* Abstract: exactly n bytes. */
		if (bpf_probe_read_kernel(p->path, n, src))
			return 0;
		p->len = n;
		return 1;
	}
	/* Filesystem: up to the first NUL within n bytes, as unix_mkname_bsd() resolves it. The
	 * kernel copied the address into a sockaddr_storage (128 bytes), so reading one byte past
	 * n stays inside it; the helper stops at n bytes and terminates. A 108-byte name without
	 * a NUL loses its last byte here (and so matches no configured name). */
	got = bpf_probe_read_kernel_str(p->path, n < SLUICE_UNIX_PATH_MAX ? n + 1 : n, src);
	if (got <= 1)
		return 0;
	p->len = (__u32)(got - 1);
	return 1;
}

/* The inode number of the connecting socket: what sock_diag reports as the peer of the
 * connection the agent accepts. */
static __always_inline __u64 socket_ino(struct bpf_sock_addr_kern *sa)
{
	struct socket *so = BPF_CORE_READ(sa, sk, sk_socket);
	struct socket_alloc *alloc = (void *)so; /* `socket` is socket_alloc's first member */

	if (!so)
		return 0;
	return BPF_CORE_READ(alloc, vfs_inode.i_ino);
}

static __always_inline int exempt(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	struct unix_knobs *knobs = bpf_map_lookup_elem(&unix_knobs, &zero);
	__u64 cgroup = bpf_get_current_cgroup_id();
	struct bpf_sock *sk = ctx->sk;

	/* SO_MARK needs CAP_NET_ADMIN to set, so clients cannot forge it. ctx->sk is never NULL
	 * here; the check keeps the verifier content should it ever be "sock_or_null". */
	if (knobs && knobs->exempt_mark != 0 && sk && sk->mark == knobs->exempt_mark) {
		count(SLUICE_UNIX_CNT_EXEMPT_MARK);
		return 1;
	}
	if (bpf_map_lookup_elem(&unix_exempt, &cgroup)) {
		count(SLUICE_UNIX_CNT_EXEMPT_CGROUP);
		return 1;
	}
	return 0;
}

SEC("cgroup/connect_unix")
int sluice_connect_unix(struct bpf_sock_addr *ctx)
{
	struct bpf_sock_addr_kern *sa = bpf_cast_to_kern_ctx(ctx);
	struct unix_record rec = {};
	struct unix_target *t;
	__u64 uid_gid, ino;
	__u32 len;

	if (ctx->type != SOCK_STREAM)
		return SLUICE_ALLOW;
	if (!read_path(sa, &rec.orig))
		return SLUICE_ALLOW;
	t = bpf_map_lookup_elem(&unix_targets, &rec.orig);
	if (!t)
		return SLUICE_ALLOW;
	if (exempt(ctx))
		return SLUICE_ALLOW;

	rec.target_id = t->target_id;
	uid_gid = bpf_get_current_uid_gid();
	rec.uid = (__u32)uid_gid;
	rec.gid = (__u32)(uid_gid >> 32);
	rec.pid = (__u32)(bpf_get_current_pid_tgid() >> 32);
	rec.cgroup_id = bpf_get_current_cgroup_id();
	rec.boot_ns = bpf_ktime_get_boot_ns();
	bpf_get_current_comm(rec.comm, sizeof(rec.comm));

	/* Fail closed: without a record the agent refuses the connection, never the reverse. */
	ino = socket_ino(sa);
	if (ino == 0 || bpf_map_update_elem(&unix_conns, &ino, &rec, BPF_ANY) != 0)
		count(SLUICE_UNIX_CNT_RECORD_FAILED);

	/* The kfunc wants a size the verifier can bound: "R3 min value is negative" /
	 * "invalid zero-sized read" without both checks. */
	len = t->listener_len;
	if (len == 0 || len > SLUICE_UNIX_PATH_MAX ||
	    bpf_sock_addr_set_sun_path(sa, t->listener, len) != 0) {
		count(SLUICE_UNIX_CNT_REFUSED);
		return SLUICE_DENY;
	}
	count(SLUICE_UNIX_CNT_REDIRECTED);
	return SLUICE_ALLOW;
}
