pub fn bench(_r: usize, _s: u64, _o: Option<&str>) -> anyhow::Result<()> {
    anyhow::bail!("bench")
}
