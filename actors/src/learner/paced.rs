//! Slow training on purpose, for demonstrations and fault tests.

/// A learner whose training takes at least `delay`: stands in for slow local training in
/// demonstrations and fault tests (a crash then lands mid-round, not between rounds).
pub struct Paced<L> {
    inner: L,
    delay: std::time::Duration,
}

impl<L> Paced<L> {
    /// Wraps `inner`; each training step sleeps `delay` before it returns.
    pub fn new(inner: L, delay: std::time::Duration) -> Self {
        Self { inner, delay }
    }
}

impl<L: crate::learner::Learner> crate::learner::Learner for Paced<L> {
    fn train(
        &mut self,
        global: flare_protocols::model::Model,
        ctx: &crate::learner::TaskContext,
    ) -> Result<crate::learner::TrainOutput, String> {
        let out = self.inner.train(global, ctx);
        std::thread::sleep(self.delay);
        out
    }

    fn validate(
        &mut self,
        model: &flare_protocols::model::Model,
        ctx: &crate::learner::TaskContext,
    ) -> Result<std::collections::BTreeMap<String, f64>, String> {
        self.inner.validate(model, ctx)
    }

    fn run_task(
        &mut self,
        input: Option<flare_protocols::model::Model>,
        ctx: &crate::learner::TaskContext,
    ) -> Result<crate::learner::TaskReply, String> {
        self.inner.run_task(input, ctx)
    }

    fn local_model(&self) -> Option<flare_protocols::model::Model> {
        self.inner.local_model()
    }
}
