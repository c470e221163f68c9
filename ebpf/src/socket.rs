//! `lsm_cgroup/socket_create`: a packet socket (AF_PACKET) sends and
//! receives frames below every cgroup hook, so a workload that could open
//! one could reach anything. Workloads Palisade manages are refused packet
//! sockets (EPERM, audited). Needs the BPF LSM; where the kernel lacks it
//! the agent says so (its posture) and the remedy is dropping CAP_NET_RAW.
use aya_ebpf::{
    helpers::generated::bpf_get_current_cgroup_id, macros::lsm_cgroup, programs::LsmContext,
};
use palisade_common::{DIR_EGRESS, counter, identity, reason};

use crate::{
    cgroup_identity,
    verdict::{Flow, count, refuse},
};

const AF_PACKET: i32 = 17;
/// What a cgroup LSM program answers.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[lsm_cgroup(hook = "socket_create")]
pub fn palisade_socket_create(ctx: LsmContext) -> i32 {
    // int socket_create(int family, int type, int protocol, int kern)
    let family: i32 = ctx.arg(0);
    let kern: i32 = ctx.arg(3);
    if family != AF_PACKET || kern != 0 {
        return ALLOW;
    }
    // SAFETY: helper without arguments; process context.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let local = cgroup_identity(cgroup_id);
    if local == identity::HOST || local == identity::UNMANAGED {
        return ALLOW;
    }
    count(counter::PACKET_SOCKETS_REFUSED);
    refuse::<true>(
        &Flow::without_peer(DIR_EGRESS, cgroup_id, local),
        reason::PACKET_SOCKET,
    );
    REFUSE
}
