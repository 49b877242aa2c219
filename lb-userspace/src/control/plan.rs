//! What a reload changes, decided from the running services and the new config alone, with no
//! socket, map or task touched: the plan [`super::Daemon::reload`] then applies. Pure, so each
//! rule is a unit test.

use std::net::SocketAddr;

use crate::config::ServiceConfig;

/// A reload's changes to the service set.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Services that need a new listening socket: new ones, and ones whose listen address
    /// changed (bound before the old socket closes). Never on xdp, where a service's address
    /// is a VIP programmed in the maps, not a socket.
    pub bind: Vec<String>,
    /// Running services the new config drops: they stop accepting; open connections finish.
    pub remove: Vec<String>,
    /// xdp: VIPs no service holds any more (their service left, or moved to another address,
    /// and no other service took the address over), to unprogram.
    pub removed_vips: Vec<SocketAddr>,
}

/// The plan from `running` (name, listen address of each running service) to `new`.
pub fn plan(running: &[(&str, SocketAddr)], new: &[ServiceConfig], xdp: bool) -> Plan {
    let was = |name: &str| running.iter().find(|(n, _)| *n == name).map(|(_, l)| *l);
    let bind = if xdp {
        Vec::new()
    } else {
        new.iter()
            .filter(|s| was(&s.name) != Some(s.listen))
            .map(|s| s.name.clone())
            .collect()
    };
    let remove: Vec<String> = running
        .iter()
        .filter(|(name, _)| !new.iter().any(|s| s.name == *name))
        .map(|(name, _)| (*name).to_owned())
        .collect();
    let mut removed_vips: Vec<SocketAddr> = running
        .iter()
        .filter(|(name, listen)| {
            new.iter()
                .find(|s| s.name == *name)
                .is_none_or(|s| s.listen != *listen)
        })
        .map(|(_, listen)| *listen)
        .filter(|vip| !new.iter().any(|s| s.listen == *vip))
        .collect();
    removed_vips.dedup();
    Plan {
        bind,
        remove,
        removed_vips,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, listen: &str) -> ServiceConfig {
        let yaml = format!(
            "services:\n  - name: {name}\n    listen: {listen}\n    backends:\n      - address: 10.9.9.9:80\n"
        );
        let mut config = crate::config::parse(&yaml, "test.yaml").expect("a valid config");
        config.services.remove(0)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_unchanged_service_set_changes_nothing() {
        let new = [service("a", "127.0.0.1:80"), service("b", "127.0.0.1:81")];
        let running = [("a", addr("127.0.0.1:80")), ("b", addr("127.0.0.1:81"))];
        for xdp in [false, true] {
            assert_eq!(plan(&running, &new, xdp), Plan::default());
        }
    }

    #[test]
    fn a_new_service_binds_and_a_dropped_one_is_removed_with_its_vip() {
        let new = [service("a", "127.0.0.1:80"), service("c", "127.0.0.1:82")];
        let running = [("a", addr("127.0.0.1:80")), ("b", addr("127.0.0.1:81"))];
        let p = plan(&running, &new, false);
        assert_eq!(p.bind, ["c"]);
        assert_eq!(p.remove, ["b"]);
        assert_eq!(p.removed_vips, [addr("127.0.0.1:81")]);
        // xdp binds nothing: the addresses are VIPs.
        let p = plan(&running, &new, true);
        assert!(p.bind.is_empty());
        assert_eq!(p.remove, ["b"]);
    }

    #[test]
    fn a_moved_service_binds_its_new_address_and_frees_the_old_vip() {
        let new = [service("a", "127.0.0.1:90")];
        let running = [("a", addr("127.0.0.1:80"))];
        let p = plan(&running, &new, false);
        assert_eq!(p.bind, ["a"]);
        assert!(p.remove.is_empty());
        assert_eq!(p.removed_vips, [addr("127.0.0.1:80")]);
    }

    /// Two services swap addresses, or one takes over the address another leaves: every VIP
    /// still has an owner, so none is unprogrammed (its new owner rewrites it).
    #[test]
    fn a_vip_another_service_takes_over_stays_programmed() {
        let running = [("a", addr("127.0.0.1:80")), ("b", addr("127.0.0.1:81"))];
        let swapped = [service("a", "127.0.0.1:81"), service("b", "127.0.0.1:80")];
        let p = plan(&running, &swapped, true);
        assert!(p.removed_vips.is_empty(), "{p:?}");
        let taken = [service("c", "127.0.0.1:80")];
        let p = plan(&running, &taken, true);
        assert_eq!(p.remove, ["a", "b"]);
        assert_eq!(p.removed_vips, [addr("127.0.0.1:81")]);
    }
}
