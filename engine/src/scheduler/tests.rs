use super::*;

fn cfg(policy: Policy) -> SchedulerConfig {
    SchedulerConfig { policy, max_running: 8, max_batched_tokens: 32, chunk_size: 8 }
}

fn r(i: u64) -> RequestId {
    RequestId(i)
}

/// Runs the plan as a model would: marks it computed and appends a token for every sample.
fn step(s: &mut Scheduler, produced: &mut HashMap<RequestId, usize>, max_new: usize) -> Plan {
    let plan = s.schedule();
    s.complete(&plan);
    for item in &plan.items {
        if item.sample {
            let n = produced.entry(item.id).or_default();
            *n += 1;
            if *n >= max_new {
                s.finish(item.id);
            } else {
                s.append_token(item.id, 1000 + *n as u32);
            }
        }
    }
    plan
}

fn items(plan: &Plan) -> Vec<(u64, usize, usize, bool)> {
    plan.items.iter().map(|i| (i.id.0, i.start, i.len, i.sample)).collect()
}

#[test]
fn chunked_splits_long_prompts_around_running_decodes() {
    let mut s = Scheduler::new(cfg(Policy::Chunked), 64, 4);
    let mut produced = HashMap::new();
    s.add(r(1), vec![1; 3], 10).unwrap();
    assert_eq!(items(&step(&mut s, &mut produced, 10)), vec![(1, 0, 3, true)]);
    s.add(r(2), (0..20).collect(), 10).unwrap();
    // Budget 8: one decode token, then a 7-token chunk of the new prompt, and so on.
    assert_eq!(items(&step(&mut s, &mut produced, 10)), vec![(1, 3, 1, true), (2, 0, 7, false)]);
    assert_eq!(items(&step(&mut s, &mut produced, 10)), vec![(1, 4, 1, true), (2, 7, 7, false)]);
    assert_eq!(items(&step(&mut s, &mut produced, 10)), vec![(1, 5, 1, true), (2, 14, 6, true)]);
    assert_eq!(items(&step(&mut s, &mut produced, 10)), vec![(1, 6, 1, true), (2, 20, 1, true)]);
}

#[test]
fn prefill_first_pauses_decodes_for_new_prompts() {
    let mut s = Scheduler::new(cfg(Policy::PrefillFirst), 64, 4);
    let mut produced = HashMap::new();
    s.add(r(1), vec![1; 5], 10).unwrap();
    step(&mut s, &mut produced, 10);
    assert_eq!(items(&step(&mut s, &mut produced, 10)), vec![(1, 5, 1, true)]);
    s.add(r(2), vec![2; 6], 10).unwrap();
    s.add(r(3), vec![3; 6], 10).unwrap();
    assert_eq!(items(&step(&mut s, &mut produced, 10)), vec![(2, 0, 6, true), (3, 0, 6, true)]);
    assert_eq!(items(&step(&mut s, &mut produced, 10)), vec![(1, 6, 1, true), (2, 6, 1, true), (3, 6, 1, true)]);
}

#[test]
fn decode_first_admits_whole_prompts_into_the_leftover_budget() {
    let mut s = Scheduler::new(cfg(Policy::DecodeFirst), 64, 4);
    let mut produced = HashMap::new();
    s.add(r(1), vec![1; 4], 50).unwrap();
    step(&mut s, &mut produced, 50);
    s.add(r(2), vec![2; 31], 50).unwrap();
    s.add(r(3), vec![3; 2], 50).unwrap();
    // 1 decode + 31 prompt tokens fill the 32 budget; r3 waits its turn (FCFS).
    assert_eq!(items(&step(&mut s, &mut produced, 50)), vec![(1, 4, 1, true), (2, 0, 31, true)]);
    assert_eq!(items(&step(&mut s, &mut produced, 50)), vec![(1, 5, 1, true), (2, 31, 1, true), (3, 0, 2, true)]);
    // A prompt larger than the whole budget waits while others run...
    s.add(r(4), vec![4; 40], 50).unwrap();
    let p = step(&mut s, &mut produced, 50);
    assert!(p.items.iter().all(|i| i.id != r(4)));
    // ...and runs whole once the batch is empty.
    for id in [1, 2, 3] {
        s.finish(r(id));
    }
    assert_eq!(items(&step(&mut s, &mut produced, 50)), vec![(4, 0, 40, true)]);
}

#[test]
fn running_out_of_blocks_preempts_the_latest_arrival_and_it_resumes() {
    // 6 blocks of 4 tokens: two sequences of 8-token prompts fit, but not their growth.
    let mut s = Scheduler::new(SchedulerConfig { max_running: 8, ..cfg(Policy::Chunked) }, 6, 4);
    let mut produced = HashMap::new();
    s.add(r(1), vec![1; 8], 8).unwrap();
    s.add(r(2), vec![2; 7], 8).unwrap();
    let mut preempted = Vec::new();
    for _ in 0..100 {
        if !s.has_work() {
            break;
        }
        let plan = step(&mut s, &mut produced, 8);
        preempted.extend(plan.preempted.iter().copied());
    }
    assert!(!s.has_work(), "every sequence finished");
    assert_eq!(preempted.first(), Some(&r(2)), "the later arrival is preempted");
    assert_eq!(produced[&r(1)], 8);
    assert_eq!(produced[&r(2)], 8);
    assert_eq!(s.usage().used, 0);
    assert!(s.stats.preemptions >= 1);
}

#[test]
fn prefix_cache_hits_skip_compute() {
    let mut s = Scheduler::new(cfg(Policy::Chunked), 64, 4);
    let mut produced = HashMap::new();
    let prompt: Vec<u32> = (0..12).collect();
    s.add(r(1), prompt.clone(), 1).unwrap();
    while s.has_work() {
        step(&mut s, &mut produced, 1);
    }
    let before = s.stats.computed_tokens;
    s.add(r(2), prompt.iter().copied().chain([77, 78]).collect(), 1).unwrap();
    let plan = step(&mut s, &mut produced, 1);
    // 12 cached tokens (3 blocks); only the 2 new ones run.
    assert_eq!(items(&plan), vec![(2, 12, 2, true)]);
    assert_eq!(s.stats.computed_tokens - before, 2);
    assert_eq!(s.stats.cached_tokens, 12);
}

#[test]
fn impossible_requests_are_refused_up_front() {
    let mut s = Scheduler::new(cfg(Policy::Chunked), 4, 4);
    assert!(matches!(s.add(r(1), vec![1; 10], 7), Err(EngineError::KvCapacity { .. })));
    assert!(s.add(r(1), vec![], 1).is_err());
    s.add(r(1), vec![1; 4], 4).unwrap();
    assert!(s.add(r(1), vec![1; 4], 4).is_err(), "duplicate id");
}

#[test]
fn many_sequences_with_a_tiny_pool_all_finish_under_every_policy() {
    for policy in [Policy::PrefillFirst, Policy::DecodeFirst, Policy::Chunked] {
        let mut s = Scheduler::new(cfg(policy), 10, 4);
        let mut produced = HashMap::new();
        for i in 0..12u64 {
            let len = 1 + (i as usize * 7) % 13;
            s.add(r(i), (0..len as u32).map(|t| t + i as u32).collect(), 12).unwrap();
        }
        let mut steps = 0;
        while s.has_work() {
            let plan = step(&mut s, &mut produced, 12);
            assert!(!plan.is_empty(), "{policy}: a step with work left did nothing");
            steps += 1;
            assert!(steps < 5000, "{policy}: no progress");
        }
        assert!(produced.values().all(|&n| n == 12), "{policy}");
        assert_eq!(s.usage().used, 0, "{policy}: blocks leaked");
    }
}
