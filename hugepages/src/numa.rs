//! NUMA placement: the machine's nodes and CPUs (from hwloc), the node a network
//! interface hangs off (from sysfs), binding memory to a node, pinning a thread.
//!
//! Workers are placed on the node of the NIC they drive, with their buffers bound to the
//! same node, so packets, buffers and the CPU touching them share a memory controller.

use crate::MemoryError;
use hwlocality::Topology;
use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::object::types::ObjectType;
use std::path::Path;

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// The OS index (as in `/sys/devices/system/node/nodeN`).
    pub os_index: usize,
    /// OS indices of the logical CPUs local to the node.
    pub cpus: Vec<usize>,
    /// Physical cores local to the node.
    pub cores: usize,
    /// Memory local to the node, in bytes.
    pub memory_bytes: u64,
}

/// The machine as workers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineTopology {
    /// NUMA nodes, by OS index.
    pub nodes: Vec<NumaNode>,
    /// Physical cores in the machine.
    pub cores: usize,
    /// Logical CPUs in the machine.
    pub cpus: usize,
}

fn numa_err(what: &str, e: impl std::fmt::Display) -> MemoryError {
    MemoryError::Numa(format!("{what}: {e}"))
}

/// Read the topology with hwloc.
pub fn topology() -> Result<MachineTopology, MemoryError> {
    let topo = Topology::new().map_err(|e| numa_err("loading topology", e))?;
    let cores_in = |set: &hwlocality::cpu::cpuset::CpuSet| {
        topo.objects_with_type(ObjectType::Core)
            .filter(|core| core.cpuset().is_some_and(|c| set.includes(&*c)))
            .count()
    };
    let nodes = topo
        .objects_with_type(ObjectType::NUMANode)
        .map(|node| {
            let cpuset = node.cpuset().map(|c| c.clone_target()).unwrap_or_default();
            NumaNode {
                os_index: node.os_index().unwrap_or(0),
                cpus: cpuset.iter_set().map(usize::from).collect(),
                cores: cores_in(&cpuset),
                memory_bytes: node.total_memory(),
            }
        })
        .collect();
    Ok(MachineTopology {
        nodes,
        cores: topo.objects_with_type(ObjectType::Core).count(),
        cpus: topo.objects_with_type(ObjectType::PU).count(),
    })
}

/// The NUMA node a network interface's device is attached to, from
/// `/sys/class/net/<ifname>/device/numa_node`. `Ok(None)` for virtual interfaces
/// (loopback, veth, TUN) and for devices the firmware did not place (`-1`).
pub fn interface_numa_node(ifname: &str) -> Result<Option<usize>, MemoryError> {
    if ifname.is_empty() || ifname.contains('/') || ifname == "." || ifname == ".." {
        return Err(MemoryError::Numa(format!(
            "invalid interface name {ifname:?}"
        )));
    }
    let iface = Path::new("/sys/class/net").join(ifname);
    if !iface.exists() {
        return Err(MemoryError::Numa(format!(
            "no network interface {ifname:?}"
        )));
    }
    let path = iface.join("device/numa_node");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(|n| usize::try_from(n).ok())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(MemoryError::Sysfs { path, source }),
    }
}

/// Bind `memory` to NUMA node `node` (strictly) before it is touched.
pub(crate) fn bind_to_node(memory: &[u8], node: usize) -> Result<(), MemoryError> {
    let topo = Topology::new().map_err(|e| numa_err("loading topology", e))?;
    let Some(node_obj) = topo
        .objects_with_type(ObjectType::NUMANode)
        .find(|n| n.os_index() == Some(node))
    else {
        return Err(MemoryError::Numa(format!(
            "no NUMA node {node} on this machine ({} nodes)",
            topo.objects_with_type(ObjectType::NUMANode).count()
        )));
    };
    let nodeset = node_obj
        .nodeset()
        .map(|s| s.clone_target())
        .ok_or_else(|| MemoryError::Numa(format!("NUMA node {node} has no nodeset")))?;
    topo.bind_memory_area::<[u8], _>(
        memory,
        &nodeset,
        MemoryBindingPolicy::Bind,
        MemoryBindingFlags::STRICT,
    )
    .map_err(|e| numa_err(&format!("binding {} bytes to node {node}", memory.len()), e))
}

/// Pin the calling thread to one logical CPU.
pub fn pin_current_thread(cpu: usize) -> Result<(), MemoryError> {
    let available = core_affinity::get_core_ids().unwrap_or_default();
    if !available.iter().any(|c| c.id == cpu) {
        return Err(MemoryError::Pin {
            cpu,
            why: format!(
                "not one of the {} CPUs this process may use",
                available.len()
            ),
        });
    }
    if core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        Ok(())
    } else {
        Err(MemoryError::Pin {
            cpu,
            why: "sched_setaffinity refused".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Arena, ArenaOptions, PagePreference};

    #[test]
    fn topology_lists_every_cpu_once() {
        let topo = topology().unwrap();
        eprintln!("{topo:?}");
        assert!(!topo.nodes.is_empty());
        let cpus: usize = topo.nodes.iter().map(|n| n.cpus.len()).sum();
        assert_eq!(cpus, topo.cpus);
        assert!(topo.cores >= 1 && topo.cores <= topo.cpus);
    }

    #[test]
    fn loopback_has_no_numa_node_and_bad_names_are_errors() {
        assert_eq!(interface_numa_node("lo").unwrap(), None);
        assert!(interface_numa_node("no-such-if0").is_err());
        assert!(interface_numa_node("../etc").is_err());
    }

    #[test]
    fn arena_binds_to_an_existing_node_and_refuses_a_missing_one() {
        let topo = topology().unwrap();
        let node = topo.nodes[0].os_index;
        let opts = |numa_node| ArenaOptions {
            prefer: PagePreference::Small,
            numa_node,
            populate: true,
        };
        let a = Arena::new(1 << 20, &opts(Some(node))).unwrap();
        assert_eq!(a.numa_node(), Some(node));
        let missing = topo.nodes.iter().map(|n| n.os_index).max().unwrap() + 64;
        let err = Arena::new(1 << 20, &opts(Some(missing))).unwrap_err();
        assert!(err.to_string().contains("no NUMA node"), "{err}");
    }

    #[test]
    fn pinning_to_an_allowed_cpu_works_and_a_missing_one_is_refused() {
        let cpu = core_affinity::get_core_ids().unwrap()[0].id;
        std::thread::spawn(move || pin_current_thread(cpu).unwrap())
            .join()
            .unwrap();
        assert!(pin_current_thread(100_000).is_err());
    }
}
