// SPDX-License-Identifier: GPL-2.0
/* sluice.bpf.c: steer every TCP connect() to a protected destination into the local proxy.
 *
 * API (program names are what agent/src/intercept loads; section names give aya the type):
 *   sluice_connect4      cgroup/connect4      redirect protected IPv4 connects, save the record
 *   sluice_connect6      cgroup/connect6      same for IPv6 and IPv4-mapped IPv6 destinations
 *   sluice_sockops       sockops              on ACTIVE_ESTABLISHED, copy the record to `conns`
 *   sluice_getpeername4  cgroup/getpeername4  the client sees its original peer
 *   sluice_getpeername6  cgroup/getpeername6  same, 16-byte form
 *   sluice_sock_release  cgroup/sock_release  forget the socket's record when it is closed
 *
 * Maps: `targets` (userspace writes, BPF_F_RDONLY_PROG), `socks` (socket cookie -> record),
 * `conns` (4-tuple as the proxy sees it -> record), `counters` (per-CPU, enum sluice_counter).
 * Knobs: `const volatile` globals set by the loader before load (`proxy_port`, `proxy_ip4`,
 * `exempt_mark`, `exempt_cgroup_id`, `proxy_netns_cookie`); the verifier sees them as
 * constants.
 *
 * Invariants:
 *   - Every address in a map is 16 bytes, network order, IPv4 as ::ffff:a.b.c.d; ports are host
 *     order (see sluice.h). One helper per direction does the conversion.
 *   - A protected connect is never left untouched unless it is exempt (SO_MARK or the agent's
 *     cgroup): if saving its record fails it is redirected anyway (fail closed, see below).
 *   - Identity (uid, gid, pid, comm, cgroup) is captured in connect(), where `current` is the
 *     caller; sockops runs in softirq context and only moves the record.
 *   - The proxy's listeners live in the agent's network namespace. A redirect from another
 *     namespace (a container) would land on that namespace's own loopback, so a protected
 *     connect from there is refused (EPERM), never redirected and never let through. A connect
 *     there to a loopback or unspecified address is that namespace's own host, not ours: it
 *     passes untouched.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sluice.h"

/* Not in linux/bpf.h, and <sys/socket.h> is not usable for -target bpf. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1

/* A context load the compiler may neither sink into a branch nor merge with another one. */
#define CTX_READ(field) (*(volatile __typeof__(field) *)&(field))

/* Return codes of cgroup sock_addr programs: 1 lets the call proceed (possibly rewritten), 0
 * fails it with EPERM. */
#define SLUICE_ALLOW 1
#define SLUICE_DENY 0

char LICENSE[] SEC("license") = "GPL";

/* Set by the loader (EbpfLoader::override_global). Defaults keep the object loadable alone. */
const volatile __u32 proxy_port = 0;                    /* host order */
const volatile __u32 proxy_ip4 = bpf_htonl(0x7f000001); /* network order, 127.0.0.1 */
const volatile __u32 exempt_mark = 0;                   /* 0: no SO_MARK exemption */
const volatile __u64 exempt_cgroup_id = 0;              /* 0: no cgroup exemption */
const volatile __u64 proxy_netns_cookie = 0;            /* the agent's netns; 0: no check */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	/* Only userspace writes targets: the verifier rejects any program store into it. */
	__uint(map_flags, BPF_F_RDONLY_PROG);
	__type(key, struct target_key);
	__type(value, struct target_value);
} targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* socket cookie */
	__type(value, struct orig_record);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct conn_key);
	__type(value, struct orig_record);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SLUICE_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &which);

	/* The verifier demands the NULL check even though the index is always in range:
	 * "R0 invalid mem access 'map_value_or_null'". */
	if (c)
		*c += 1; /* per-CPU slot: no other writer, no atomic needed */
}

/* ---- addresses: 16-byte network-order form, IPv4 as IPv4-mapped ---------------------- */

static __always_inline void addr_from_ip4(__u32 out[4], __u32 ip4 /* network order */)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0x0000ffff);
	out[3] = ip4;
}

static __always_inline int addr_is_v4mapped(const __u32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

/* 127/8, 0.0.0.0, ::1, :: and the v4-mapped forms of the first two: every destination that
 * reaches a service listening on the local host whatever address it bound. */
static __always_inline int addr_is_local(const __u32 a[4])
{
	if (addr_is_v4mapped(a))
		return a[3] == 0 || (bpf_ntohl(a[3]) >> 24) == 127;
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && (a[3] == 0 || a[3] == bpf_htonl(1));
}

/* targets: EXACT {addr, port}, then LOCAL {0, port} for local destinations, then ANY {0, port}.
 * Returns the target id through *target_id and 1 on a hit. */
static __always_inline int lookup_target(const __u32 addr[4], __u16 port, __u32 *target_id)
{
	struct target_key key = {};
	struct target_value *v;

	__builtin_memcpy(key.addr, addr, 16);
	key.port = port;
	key.kind = SLUICE_MATCH_EXACT;
	v = bpf_map_lookup_elem(&targets, &key);
	if (!v && addr_is_local(addr)) {
		__builtin_memset(key.addr, 0, sizeof(key.addr));
		key.kind = SLUICE_MATCH_LOCAL;
		v = bpf_map_lookup_elem(&targets, &key);
	}
	if (!v) {
		__builtin_memset(key.addr, 0, sizeof(key.addr));
		key.kind = SLUICE_MATCH_ANY;
		v = bpf_map_lookup_elem(&targets, &key);
	}
	if (!v)
		return 0;
	*target_id = v->target_id;
	return 1;
}

/* ---- connect4 / connect6 ------------------------------------------------------------- */

/* What a connect hook does with a connect. */
enum steer_verdict {
	STEER_PASS,     /* not protected, or exempt: untouched */
	STEER_REDIRECT, /* rewrite the destination to the proxy */
	STEER_REFUSE,   /* fail connect() with EPERM */
};

/* Shared by both hooks once the destination is in 16-byte form. */
static __always_inline enum steer_verdict steer(struct bpf_sock_addr *ctx, const __u32 dst[4],
						__u16 family)
{
	struct orig_record rec = {};
	__u64 cookie = bpf_get_socket_cookie(ctx);
	__u16 port = bpf_ntohs(ctx->user_port);
	__u32 target_id;
	__u64 uid_gid;
	struct bpf_sock *sk;

	if (!lookup_target(dst, port, &target_id)) {
		/* A socket may connect again after a failed connect; never let a stale record make
		 * getpeername() lie about an unprotected peer. */
		bpf_map_delete_elem(&socks, &cookie);
		return STEER_PASS;
	}

	/* Exemptions are checked after the lookup so that the counters only count protected
	 * connects. SO_MARK needs CAP_NET_ADMIN to set, so clients cannot forge it. */
	sk = ctx->sk;
	/* ctx->sk is PTR_TO_SOCKET here, never NULL; the check costs nothing and keeps the program
	 * valid should a kernel ever type it "sock_or_null" ("invalid mem access 'sock_or_null'"). */
	if (exempt_mark != 0 && sk && sk->mark == exempt_mark) {
		count(SLUICE_CNT_EXEMPT_MARK);
		bpf_map_delete_elem(&socks, &cookie);
		return STEER_PASS;
	}
	if (exempt_cgroup_id != 0 && bpf_get_current_cgroup_id() == exempt_cgroup_id) {
		count(SLUICE_CNT_EXEMPT_CGROUP);
		bpf_map_delete_elem(&socks, &cookie);
		return STEER_PASS;
	}
	if (proxy_netns_cookie != 0 && bpf_get_netns_cookie(ctx) != proxy_netns_cookie) {
		bpf_map_delete_elem(&socks, &cookie);
		/* Loopback there is that namespace's own host; anything else may be our backend,
		 * which the proxy cannot be reached for from there. */
		if (addr_is_local(dst))
			return STEER_PASS;
		count(SLUICE_CNT_OTHER_NETNS);
		return STEER_REFUSE;
	}

	__builtin_memcpy(rec.orig_addr, dst, 16);
	rec.orig_port = port;
	rec.family = family;
	rec.target_id = target_id;
	uid_gid = bpf_get_current_uid_gid();
	rec.uid = (__u32)uid_gid;
	rec.gid = (__u32)(uid_gid >> 32);
	rec.pid = (__u32)(bpf_get_current_pid_tgid() >> 32);
	rec.cgroup_id = bpf_get_current_cgroup_id();
	rec.boot_ns = bpf_ktime_get_boot_ns();
	bpf_get_current_comm(rec.comm, sizeof(rec.comm));

	/* Fail closed: if the record cannot be saved (map full of non-evictable entries, -ENOMEM)
	 * the connection is still redirected. The proxy finds no record for it and refuses it, so
	 * a full map can deny service but never open a path around the proxy. */
	if (bpf_map_update_elem(&socks, &cookie, &rec, BPF_ANY) != 0)
		count(SLUICE_CNT_RECORD_FAILED);
	count(SLUICE_CNT_REDIRECTED);
	return STEER_REDIRECT;
}

SEC("cgroup/connect4")
int sluice_connect4(struct bpf_sock_addr *ctx)
{
	__u32 dst[4];

	if (ctx->type != SOCK_STREAM)
		return SLUICE_ALLOW;
	addr_from_ip4(dst, ctx->user_ip4);
	switch (steer(ctx, dst, AF_INET)) {
	case STEER_REFUSE:
		return SLUICE_DENY;
	case STEER_REDIRECT:
		ctx->user_ip4 = proxy_ip4;
		ctx->user_port = bpf_htons((__u16)proxy_port);
		break;
	case STEER_PASS:
		break;
	}
	return SLUICE_ALLOW;
}

SEC("cgroup/connect6")
int sluice_connect6(struct bpf_sock_addr *ctx)
{
	__u32 dst[4];

	if (ctx->type != SOCK_STREAM)
		return SLUICE_ALLOW;
	/* user_ip6 may only be read/written as aligned 4-byte words (narrower or wider accesses are
	 * "invalid bpf_context access"), hence the word-by-word copies. */
	dst[0] = ctx->user_ip6[0];
	dst[1] = ctx->user_ip6[1];
	dst[2] = ctx->user_ip6[2];
	dst[3] = ctx->user_ip6[3];
	switch (steer(ctx, dst, AF_INET6)) {
	case STEER_REFUSE:
		return SLUICE_DENY;
	case STEER_PASS:
		return SLUICE_ALLOW;
	case STEER_REDIRECT:
		if (addr_is_v4mapped(dst)) {
			/* An AF_INET6 socket going to ::ffff:a.b.c.d speaks IPv4 on the wire: keep it
			 * mapped, pointed at the proxy's IPv4 listener. */
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
			ctx->user_ip6[3] = proxy_ip4;
		} else {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = 0;
			ctx->user_ip6[3] = bpf_htonl(1);
		}
		ctx->user_port = bpf_htons((__u16)proxy_port);
		break;
	}
	return SLUICE_ALLOW;
}

/* ---- sockops: the record moves to the 4-tuple the proxy will see at accept() ----------- */

SEC("sockops")
int sluice_sockops(struct bpf_sock_ops *skops)
{
	struct conn_key key = {};
	struct orig_record *rec;
	__u32 client[4], proxy[4], local4, remote4;
	__u64 cookie;

	/* Runs in tcp_finish_connect(), before the client's final ACK leaves: the proxy's accept()
	 * cannot return before this entry exists. Not gated by bpf_sock_ops_cb_flags. */
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;

	cookie = bpf_get_socket_cookie(skops);
	rec = bpf_map_lookup_elem(&socks, &cookie);
	if (!rec)
		return 1;

	/* The context fields are read through volatile, at constant offsets, before branching on
	 * the family: otherwise clang sinks the loads into the branches and merges them into one
	 * load through a computed context pointer, which the verifier rejects ("dereference of
	 * modified ctx ptr R4 off=28 disallowed"). *_ip6 fields also only allow aligned 4-byte
	 * reads. A v6 socket connected to a v4-mapped address reports v4-mapped addresses here. */
	client[0] = CTX_READ(skops->local_ip6[0]);
	client[1] = CTX_READ(skops->local_ip6[1]);
	client[2] = CTX_READ(skops->local_ip6[2]);
	client[3] = CTX_READ(skops->local_ip6[3]);
	proxy[0] = CTX_READ(skops->remote_ip6[0]);
	proxy[1] = CTX_READ(skops->remote_ip6[1]);
	proxy[2] = CTX_READ(skops->remote_ip6[2]);
	proxy[3] = CTX_READ(skops->remote_ip6[3]);
	local4 = CTX_READ(skops->local_ip4);
	remote4 = CTX_READ(skops->remote_ip4);
	if (skops->family == AF_INET) {
		addr_from_ip4(client, local4);
		addr_from_ip4(proxy, remote4);
	}
	__builtin_memcpy(key.client_addr, client, 16);
	__builtin_memcpy(key.proxy_addr, proxy, 16);
	/* local_port is host order. remote_port is the network-order 16-bit port loaded as a
	 * 32-bit word whose upper half holds it on little-endian (the kernel shifts it left 16):
	 * bpf_ntohl() of the whole word yields the host-order port on either endianness. */
	key.client_port = (__u16)skops->local_port;
	key.proxy_port = (__u16)bpf_ntohl(skops->remote_port);

	if (bpf_map_update_elem(&conns, &key, rec, BPF_ANY) != 0) {
		count(SLUICE_CNT_RECORD_FAILED);
		return 1;
	}
	count(SLUICE_CNT_ESTABLISHED);
	return 1;
}

/* ---- getpeername: the client keeps seeing the destination it asked for ---------------- */

SEC("cgroup/getpeername4")
int sluice_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_record *rec = bpf_map_lookup_elem(&socks, &cookie);
	__u32 ip4;

	if (!rec)
		return SLUICE_ALLOW;
	/* orig_addr is a byte array; copy the word out rather than cast (alignment unknown). */
	__builtin_memcpy(&ip4, &rec->orig_addr[12], 4);
	ctx->user_ip4 = ip4;
	ctx->user_port = bpf_htons(rec->orig_port);
	count(SLUICE_CNT_PEER_RESTORED);
	return SLUICE_ALLOW;
}

SEC("cgroup/getpeername6")
int sluice_getpeername6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_record *rec = bpf_map_lookup_elem(&socks, &cookie);
	__u32 a[4];

	if (!rec)
		return SLUICE_ALLOW;
	__builtin_memcpy(a, rec->orig_addr, 16);
	ctx->user_ip6[0] = a[0];
	ctx->user_ip6[1] = a[1];
	ctx->user_ip6[2] = a[2];
	ctx->user_ip6[3] = a[3];
	ctx->user_port = bpf_htons(rec->orig_port);
	count(SLUICE_CNT_PEER_RESTORED);
	return SLUICE_ALLOW;
}

/* ---- sock_release: drop the socket's record; `conns` entries are taken by the proxy ---- */

SEC("cgroup/sock_release")
int sluice_sock_release(struct bpf_sock *sk)
{
	__u64 cookie = bpf_get_socket_cookie(sk);

	bpf_map_delete_elem(&socks, &cookie);
	return 1;
}
