//! The [`Broker`](super::Broker) and [`Presence`](super::Presence) of an
//! engine whose node is the only one (the in-memory and the durable embedded
//! engines).

use std::collections::HashMap;

use parking_lot::Mutex;

/// [`Broker`] and [`Presence`] of an engine whose node is the only one (the
/// in-memory and the durable embedded engines): events go straight to this
/// node's hub (field `hub`), presence is counted here (field `presence`, a
/// [`LocalPresence`]).
macro_rules! single_node_broker_and_presence {
    ($engine:ty) => {
        #[async_trait]
        impl $crate::engine::Broker for $engine {
            async fn publish(&self, route: &$crate::engine::Route, event: $crate::hub::Event) -> EngineResult<()> {
                for topic in route {
                    self.hub.dispatch(topic, &event);
                }
                Ok(())
            }

            async fn subscribe(&self, _topics: &[$crate::hub::Topic]) -> EngineResult<()> {
                // The hub is the only subscriber there is.
                Ok(())
            }

            fn topics_changed(&self) {}
        }

        #[async_trait]
        impl $crate::engine::Presence for $engine {
            async fn connection_count(&self, user: &str) -> EngineResult<usize> {
                Ok(self.presence.count(user))
            }

            async fn presence_up(&self, user: &str) -> EngineResult<bool> {
                Ok(self.presence.up(user))
            }

            async fn presence_down(&self, user: &str) -> EngineResult<bool> {
                Ok(self.presence.down(user))
            }

            async fn online(&self, users: Option<&[String]>) -> EngineResult<Vec<String>> {
                Ok(self.presence.online(users))
            }
        }
    };
}
pub(crate) use single_node_broker_and_presence;

/// Presence of a single-node engine: open connections per user, here.
#[derive(Default)]
pub(crate) struct LocalPresence(Mutex<HashMap<String, usize>>);

impl LocalPresence {
    pub(crate) fn count(&self, user: &str) -> usize {
        self.0.lock().get(user).copied().unwrap_or(0)
    }

    pub(crate) fn up(&self, user: &str) -> bool {
        let mut p = self.0.lock();
        let n = p.entry(user.to_string()).or_default();
        *n += 1;
        *n == 1
    }

    pub(crate) fn down(&self, user: &str) -> bool {
        let mut p = self.0.lock();
        match p.get_mut(user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                p.remove(user);
                true
            }
            None => false,
        }
    }

    pub(crate) fn online(&self, users: Option<&[String]>) -> Vec<String> {
        let p = self.0.lock();
        let mut out: Vec<String> = match users {
            Some(list) => list.iter().filter(|u| p.contains_key(u.as_str())).cloned().collect(),
            None => p.keys().cloned().collect(),
        };
        out.sort();
        out
    }
}
