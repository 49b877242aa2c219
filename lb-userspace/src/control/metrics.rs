//! `/metrics`: Prometheus text built at scrape time from live state (no second copy of any
//! counter). Per service and backend: connections, active connections, bytes each way, connect
//! failures, health, ejections; per service: connections refused for want of a backend; per
//! daemon: reloads and the dataplane in use.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::Daemon;
use crate::state::Backend;

/// Collects from the daemon at each scrape.
#[derive(Debug)]
struct LbCollector(Arc<Daemon>);

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("dataplane", &self.dataplane)
            .finish_non_exhaustive()
    }
}

type Labels<'a> = [(&'static str, &'a str); 2];

/// A per-backend family: one sample per (service, backend).
fn backend_family(
    encoder: &mut DescriptorEncoder<'_>,
    rows: &[(String, String, Arc<Backend>)],
    name: &str,
    help: &str,
    kind: MetricType,
    value: impl Fn(&Backend) -> u64,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (service, address, backend) in rows {
        let labels: Labels<'_> = [("service", service), ("backend", address)];
        let sample = family.encode_family(&labels)?;
        let v = value(backend);
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(sample)?,
            _ => ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(sample)?,
        }
    }
    Ok(())
}

/// A counter family with one label.
fn labelled_counter<'a>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &'static str,
    values: impl Iterator<Item = (&'a str, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        ConstCounter::new(n).encode(family.encode_family(&[(label, value)])?)?;
    }
    Ok(())
}

impl Collector for LbCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let services = self.0.services();
        let rows: Vec<(String, String, Arc<Backend>)> = services
            .iter()
            .flat_map(|(name, s)| {
                s.backends
                    .iter()
                    .map(move |b| (name.clone(), b.address.to_string(), Arc::clone(b)))
            })
            .collect();
        backend_family(
            &mut encoder,
            &rows,
            "lb_connections",
            "Connections placed on the backend.",
            MetricType::Counter,
            |b| b.connections_total.load(Relaxed),
        )?;
        backend_family(
            &mut encoder,
            &rows,
            "lb_active_connections",
            "Open connections on the backend.",
            MetricType::Gauge,
            |b| b.active.load(Relaxed),
        )?;
        backend_family(
            &mut encoder,
            &rows,
            "lb_connect_failures",
            "Failed connects to the backend (each retried elsewhere while retries remain).",
            MetricType::Counter,
            |b| b.connect_failures.load(Relaxed),
        )?;
        backend_family(
            &mut encoder,
            &rows,
            "lb_backend_up",
            "1 if the backend may take new connections (up, not draining, not ejected), else 0.",
            MetricType::Gauge,
            |b| u64::from(b.eligible()),
        )?;
        backend_family(
            &mut encoder,
            &rows,
            "lb_backend_weight",
            "The backend's configured weight.",
            MetricType::Gauge,
            |b| u64::from(b.weight()),
        )?;
        backend_family(
            &mut encoder,
            &rows,
            "lb_ejections",
            "Passive ejections of the backend after consecutive connect failures.",
            MetricType::Counter,
            |b| b.ejections.load(Relaxed),
        )?;
        backend_family(
            &mut encoder,
            &rows,
            "lb_health_changes",
            "Up/down transitions decided by active health checks.",
            MetricType::Counter,
            |b| b.health_changes.load(Relaxed),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "lb_bytes",
                "Bytes relayed, by direction.",
                None,
                MetricType::Counter,
            )?;
            for (service, address, backend) in &rows {
                for (direction, v) in [
                    ("to_backend", &backend.bytes_to_backend),
                    ("to_client", &backend.bytes_to_client),
                ] {
                    let labels = [
                        ("service", service.as_str()),
                        ("backend", address.as_str()),
                        ("direction", direction),
                    ];
                    ConstCounter::new(v.load(Relaxed)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "lb_no_backend",
                "Clients reset because no backend could take them.",
                None,
                MetricType::Counter,
            )?;
            for (name, s) in &services {
                ConstCounter::new(s.no_backend.load(Relaxed))
                    .encode(family.encode_family(&[("service", name.as_str())])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "lb_local_errors",
                "Clients reset because lb itself ran out of file descriptors (its data path's \
                 share of the open-files limit), memory or local ports, at accept or while \
                 connecting to a backend (never counted against the backend).",
                None,
                MetricType::Counter,
            )?;
            for (name, s) in &services {
                ConstCounter::new(s.local_errors.load(Relaxed))
                    .encode(family.encode_family(&[("service", name.as_str())])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "lb_reloads",
                "Configuration reloads, by result.",
                None,
                MetricType::Counter,
            )?;
            for (result, v) in [
                ("ok", &self.0.reloads_ok),
                ("failed", &self.0.reloads_failed),
            ] {
                ConstCounter::new(v.load(Relaxed))
                    .encode(family.encode_family(&[("result", result)])?)?;
            }
        }
        if let Some(xdp) = &self.0.xdp {
            match xdp.counters() {
                Ok(c) => {
                    let packets = c.packets.iter().map(|(a, n)| (a.label(), n.packets));
                    labelled_counter(
                        &mut encoder,
                        "lb_xdp_packets",
                        "Packets seen by the XDP program, by verdict (summed over CPUs).",
                        "action",
                        packets,
                    )?;
                    let bytes = c.packets.iter().map(|(a, n)| (a.label(), n.bytes));
                    labelled_counter(
                        &mut encoder,
                        "lb_xdp_bytes",
                        "Bytes seen by the XDP program, by verdict.",
                        "action",
                        bytes,
                    )?;
                    let drops = c.drops.iter().map(|(r, n)| (r.label(), *n));
                    labelled_counter(
                        &mut encoder,
                        "lb_xdp_drops",
                        "Packets the XDP program dropped, by reason.",
                        "reason",
                        drops,
                    )?;
                    let events = c.events.iter().map(|(e, n)| (e.label(), *n));
                    labelled_counter(
                        &mut encoder,
                        "lb_xdp_flow_events",
                        "Flow table events in the XDP program (hits, misses, inserts, ...).",
                        "event",
                        events,
                    )?;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the XDP counters"),
            }
        }
        if let Some(sockmap) = &self.0.sockmap {
            let handed = [
                ("kernel", sockmap.handed.load(Relaxed)),
                ("userspace", sockmap.kept.load(Relaxed)),
            ];
            labelled_counter(
                &mut encoder,
                "lb_sockmap_connections",
                "Connections of the sockmap dataplane, by who relayed their bytes (userspace: \
                 the hand-over failed, e.g. a full map).",
                "relayed_by",
                handed.into_iter(),
            )?;
            labelled_counter(
                &mut encoder,
                "lb_sockmap_holds",
                "Times a direction was held for back pressure (its peer fell 4 MiB behind: the \
                 daemon relayed its bytes until the peer caught up).",
                "dataplane",
                std::iter::once(("sockmap", sockmap.holds.load(Relaxed))),
            )?;
            match sockmap.events() {
                Ok(events) => {
                    let events = lb_common::SkEvent::ALL
                        .iter()
                        .map(|e| (e.label(), events[*e as usize]));
                    labelled_counter(
                        &mut encoder,
                        "lb_sockmap_events",
                        "What the sockmap verdict program did with each skb (summed over CPUs): \
                         redirect, redirect_bytes, passed and passed_bytes (up to the daemon), no_target, \
                         no_peer, empty (a FIN alone), repeat, repeat_bytes and repeat_uncut \
                         (retransmitted bytes already handed on, cut).",
                        "event",
                        events,
                    )?;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the sockmap counters"),
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "lb_dataplane",
                "The dataplane carrying traffic (value 1).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64)
                .encode(family.encode_family(&[("dataplane", self.0.dataplane)])?)?;
        }
        Ok(())
    }
}

/// The registry, with the collector over `daemon`.
pub fn registry(daemon: Arc<Daemon>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(LbCollector(daemon)));
    registry
}

/// The Prometheus text exposition.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}
