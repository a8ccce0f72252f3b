/* sluice.h: the contract between the eBPF programs (sluice.bpf.c) and the agent
 * (agent/src/intercept/maps.rs mirrors every struct here with #[repr(C)] and size asserts).
 *
 * API:
 *   struct target_key / target_value  map `targets`  (userspace writes, programs read)
 *   struct orig_record                map `socks` by socket cookie, map `conns` by conn_key
 *   struct conn_key                   the redirected connection as the proxy sees it
 *   enum sluice_counter               index into the per-CPU array `counters`
 *
 * Every address is 16 bytes in network order: IPv6 as is, IPv4 as IPv4-mapped IPv6
 * (::ffff:a.b.c.d), so that connect4, connect6 and the proxy's accept() agree on one key.
 * Ports are host order. Changing a layout here means changing maps.rs in the same commit.
 */
#ifndef SLUICE_H
#define SLUICE_H

#define SLUICE_COMM_LEN 16

/* target_key.kind */
#define SLUICE_MATCH_EXACT 0 /* addr:port exactly */
#define SLUICE_MATCH_LOCAL 1 /* any loopback/unspecified address (127/8, 0.0.0.0, ::1, ::) on port */
#define SLUICE_MATCH_ANY 2   /* any address on port; addr is all zero */

struct target_key {
	__u8 addr[16];
	__u16 port;
	__u8 kind;
	__u8 pad;
};

struct target_value {
	__u32 target_id;
};

struct orig_record {
	__u8 orig_addr[16]; /* where the client was going */
	__u16 orig_port;
	__u16 family; /* AF_INET or AF_INET6: the client's socket family */
	__u32 target_id;
	__u32 uid;
	__u32 gid;
	__u32 pid; /* thread group id of the caller of connect() */
	__u32 pad;
	__u64 cgroup_id;
	__u64 boot_ns; /* bpf_ktime_get_boot_ns() at connect() */
	char comm[SLUICE_COMM_LEN];
};

struct conn_key {
	__u8 client_addr[16];
	__u8 proxy_addr[16];
	__u16 client_port;
	__u16 proxy_port;
	__u32 pad;
};

enum sluice_counter {
	SLUICE_CNT_REDIRECTED = 0,  /* connects rewritten to the proxy */
	SLUICE_CNT_EXEMPT_MARK,     /* protected connects let through because of SO_MARK */
	SLUICE_CNT_EXEMPT_CGROUP,   /* protected connects let through because of the agent's cgroup */
	SLUICE_CNT_ESTABLISHED,     /* redirected connections whose record moved to `conns` */
	SLUICE_CNT_PEER_RESTORED,   /* getpeername() answers rewritten to the original peer */
	SLUICE_CNT_RECORD_FAILED,   /* map updates that failed (map full, ...) */
	SLUICE_CNT_OTHER_NETNS,     /* protected connects from another network namespace, refused */
	SLUICE_CNT_MAX,
};

#endif
