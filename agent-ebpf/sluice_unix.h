/* sluice_unix.h: the contract between sluice_unix.bpf.c and the agent
 * (agent/src/intercept/unix.rs mirrors every struct here with #[repr(C)] and size asserts).
 *
 * API:
 *   struct unix_path          a unix socket address as the kernel resolves it (key of
 *                             `unix_targets`, and the original destination in a record)
 *   struct unix_target        map `unix_targets`: target id and the agent listener to go to
 *   struct unix_record        map `unix_conns`, keyed by the client socket's inode number
 *   struct unix_knobs         map `unix_knobs`, one entry: the SO_MARK exemption
 *   map `unix_exempt`         cgroup id -> 1: cgroups whose connects are never redirected
 *                             (the agent's own, the database service's)
 *   enum sluice_unix_counter  index into the per-CPU array `unix_counters`
 *
 * A path is `len` bytes of `path`, the rest zero. A filesystem name is the string up to its
 * first NUL (what unix_mkname_bsd() looks up); an abstract name starts with a NUL byte and is
 * exactly `len` bytes (addrlen minus the family field). Changing a layout here means changing
 * unix.rs in the same commit.
 */
#ifndef SLUICE_UNIX_H
#define SLUICE_UNIX_H

#define SLUICE_UNIX_PATH_MAX 108 /* UNIX_PATH_MAX */
#define SLUICE_UNIX_COMM_LEN 16

struct unix_path {
	__u32 len;
	__u8 path[SLUICE_UNIX_PATH_MAX];
};

struct unix_target {
	__u32 target_id;
	__u32 listener_len; /* bytes of listener, no NUL; 1..SLUICE_UNIX_PATH_MAX */
	__u8 listener[SLUICE_UNIX_PATH_MAX];
};

struct unix_record {
	__u32 target_id;
	__u32 uid;
	__u32 gid;
	__u32 pid; /* thread group id of the caller of connect() */
	__u64 cgroup_id;
	__u64 boot_ns; /* bpf_ktime_get_boot_ns() at connect() */
	char comm[SLUICE_UNIX_COMM_LEN];
	struct unix_path orig; /* the name the client connected to */
};

struct unix_knobs {
	__u32 exempt_mark; /* 0: no SO_MARK exemption */
	__u32 pad;
};

enum sluice_unix_counter {
	SLUICE_UNIX_CNT_REDIRECTED = 0, /* connects rewritten to an agent listener */
	SLUICE_UNIX_CNT_EXEMPT_MARK,    /* protected connects let through because of SO_MARK */
	SLUICE_UNIX_CNT_EXEMPT_CGROUP,  /* ... because of an exempt cgroup */
	SLUICE_UNIX_CNT_RECORD_FAILED,  /* records that could not be saved (still redirected) */
	SLUICE_UNIX_CNT_REFUSED,        /* protected connects refused (rewrite failed) */
	SLUICE_UNIX_CNT_MAX,
};

#endif
