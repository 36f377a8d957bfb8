//! Kernel layout facts the programs need, found at load time in the running kernel's BTF
//! and in tracefs event formats. Rust eBPF has no CO-RE, so nothing here is hard-coded.

/// Marks an offset this kernel does not have; programs needing it are not loaded.
pub const OFFSET_MISSING: u32 = u32::MAX;

/// Byte offsets, set into the `OFFSETS` global before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    // struct sock (through its embedded struct sock_common)
    pub sk_family: u32,
    /// struct sock -> sk_protocol (raw tracepoints get the socket, not its protocol)
    pub sk_protocol: u32,
    pub sk_num: u32,
    pub sk_dport: u32,
    pub sk_rcv_saddr: u32,
    pub sk_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_v6_daddr: u32,
    pub sk_net: u32,
    /// struct net -> ns.inum
    pub net_inum: u32,
    /// struct msghdr (kernel copy) -> msg_name, msg_namelen
    pub msghdr_name: u32,
    pub msghdr_namelen: u32,
    /// struct user_msghdr -> msg_name, msg_namelen; sizeof(struct mmsghdr)
    pub user_msghdr_name: u32,
    pub user_msghdr_namelen: u32,
    pub mmsghdr_size: u32,
    // tracepoints syscalls:sys_enter_sendto / sendmsg / sendmmsg
    pub tp_sendto_addr: u32,
    pub tp_sendto_addr_len: u32,
    pub tp_sendmsg_msg: u32,
    pub tp_sendmmsg_mmsg: u32,
    pub tp_sendmmsg_vlen: u32,
    // struct sk_buff
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    // struct net_device
    pub dev_ifindex: u32,
    pub dev_name: u32,
    pub dev_net: u32,
    /// struct nf_hook_state -> hook
    pub nf_state_hook: u32,
    /// sock -> sk_socket -> file -> f_inode -> i_ino (the socket's inode)
    pub sk_socket: u32,
    pub socket_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    /// sk_buff._nfct; nf_conn.tuplehash and its element size; nf_conntrack_tuple_hash.tuple;
    /// in nf_conntrack_tuple: src.u3, src.u.all, src.l3num, dst.u3, dst.u.all
    pub skb_nfct: u32,
    pub ct_tuplehash: u32,
    pub ct_tuplehash_size: u32,
    pub ct_hash_tuple: u32,
    pub tuple_src_u3: u32,
    pub tuple_src_port: u32,
    pub tuple_l3num: u32,
    pub tuple_dst_u3: u32,
    pub tuple_dst_port: u32,
    /// nf_conn.status (IPS_* bits)
    pub ct_status: u32,
    /// net_device -> mtu, rtnl_link_ops; rtnl_link_ops -> kind
    pub dev_mtu: u32,
    pub dev_link_ops: u32,
    pub link_ops_kind: u32,
    /// task_struct -> group_leader, comm (a process's name is its leader's comm)
    pub task_group_leader: u32,
    pub task_comm: u32,
    /// sk_buff -> end (from head: where skb_shared_info starts); skb_shared_info ->
    /// gso_size, gso_segs
    pub skb_end: u32,
    pub shinfo_gso_size: u32,
    pub shinfo_gso_segs: u32,
    /// The byte of a `struct sock` (a `struct udp_sock`) holding its `UDP_GRO` flag, and the
    /// flag's bit in it (`udp_flags` bit `UDP_FLAGS_GRO_ENABLED`, or the `gro_enabled`
    /// bitfield before 6.6).
    pub udp_gro_byte: u32,
    pub udp_gro_mask: u32,
}
#[cfg(feature = "user")]
// SAFETY: #[repr(C)] of fixed-width integers and byte arrays with explicit padding:
// every bit pattern is a valid value.
unsafe impl aya::Pod for Offsets {}
const _: () = assert!(core::mem::size_of::<Offsets>() == 53 * 4);

impl Offsets {
    /// Every offset missing: the value in the object before userspace fills it.
    pub const MISSING: Self = Self {
        sk_family: OFFSET_MISSING,
        sk_protocol: OFFSET_MISSING,
        sk_num: OFFSET_MISSING,
        sk_dport: OFFSET_MISSING,
        sk_rcv_saddr: OFFSET_MISSING,
        sk_daddr: OFFSET_MISSING,
        sk_v6_rcv_saddr: OFFSET_MISSING,
        sk_v6_daddr: OFFSET_MISSING,
        sk_net: OFFSET_MISSING,
        net_inum: OFFSET_MISSING,
        msghdr_name: OFFSET_MISSING,
        msghdr_namelen: OFFSET_MISSING,
        user_msghdr_name: OFFSET_MISSING,
        user_msghdr_namelen: OFFSET_MISSING,
        mmsghdr_size: OFFSET_MISSING,
        tp_sendto_addr: OFFSET_MISSING,
        tp_sendto_addr_len: OFFSET_MISSING,
        tp_sendmsg_msg: OFFSET_MISSING,
        tp_sendmmsg_mmsg: OFFSET_MISSING,
        tp_sendmmsg_vlen: OFFSET_MISSING,
        skb_head: OFFSET_MISSING,
        skb_network_header: OFFSET_MISSING,
        skb_transport_header: OFFSET_MISSING,
        skb_dev: OFFSET_MISSING,
        skb_sk: OFFSET_MISSING,
        dev_ifindex: OFFSET_MISSING,
        dev_name: OFFSET_MISSING,
        dev_net: OFFSET_MISSING,
        nf_state_hook: OFFSET_MISSING,
        sk_socket: OFFSET_MISSING,
        socket_file: OFFSET_MISSING,
        file_inode: OFFSET_MISSING,
        inode_ino: OFFSET_MISSING,
        skb_nfct: OFFSET_MISSING,
        ct_tuplehash: OFFSET_MISSING,
        ct_tuplehash_size: OFFSET_MISSING,
        ct_hash_tuple: OFFSET_MISSING,
        tuple_src_u3: OFFSET_MISSING,
        tuple_src_port: OFFSET_MISSING,
        tuple_l3num: OFFSET_MISSING,
        tuple_dst_u3: OFFSET_MISSING,
        tuple_dst_port: OFFSET_MISSING,
        ct_status: OFFSET_MISSING,
        dev_mtu: OFFSET_MISSING,
        dev_link_ops: OFFSET_MISSING,
        link_ops_kind: OFFSET_MISSING,
        task_group_leader: OFFSET_MISSING,
        task_comm: OFFSET_MISSING,
        skb_end: OFFSET_MISSING,
        shinfo_gso_size: OFFSET_MISSING,
        shinfo_gso_segs: OFFSET_MISSING,
        udp_gro_byte: OFFSET_MISSING,
        udp_gro_mask: OFFSET_MISSING,
    };
}
