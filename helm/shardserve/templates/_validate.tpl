{{/*
Checks the chart can make before anything reaches the cluster. Each failure names the values field
and the allowed range. values.schema.json already enforces types, enums and minimums; these are the
cross-field rules a JSON schema cannot express:

  * every model has a non-empty name (unique) and source; replicas and autoscaling are exclusive;
  * modelHints: tensor_parallel_size divides numAttentionHeads (and numKeyValueHeads, or the reverse:
    KV heads are replicated when tp exceeds them); expert_parallel_size divides numExperts;
  * expert_parallel_size divides tensor_parallel_size x pipeline_parallel_size (EP runs inside the
    TP x PP group, it adds no GPUs);
  * a replica fits the worker groups: GPUs per replica = num_gpus_per_worker x tp x pp. One pipeline
    stage (tp workers: num_gpus_per_worker x tp GPUs, num_cpus_per_worker x tp CPUs) must sit on one
    pod (TP runs over NVLink inside a pod); stages of one replica may span pods (PP over the network),
    so a replica needs ceil(pp / stages-per-pod) pods of one group;
  * the GPUs of all replicas (at replicas / min_replicas and at max_replicas) fit the GPUs of the
    GPU worker groups (at maxReplicas with the Ray autoscaler, else at replicas);
  * worker group replicas lie in [minReplicas, maxReplicas]; model storage paths are under mountPath.
*/}}
{{- define "shardserve.validate" -}}
{{- $v := .Values -}}
{{- $big := 1000000 -}}
{{- $models := $v.shardserve.models | default list -}}
{{- if not $models -}}
{{- fail "shardserve.models: list at least one model (name and source)" -}}
{{- end -}}
{{- if and $v.apiKey.enabled (not $v.apiKey.existingSecret) (not $v.apiKey.value) -}}
{{- fail "apiKey: enabled needs apiKey.existingSecret (name of a Secret) or apiKey.value (the chart then creates the Secret)" -}}
{{- end -}}
{{- if and $v.tls.secretName $v.shardserve.tls -}}
{{- fail "tls.secretName: the chart fills shardserve.tls from the Secret; leave shardserve.tls null (or drop tls.secretName)" -}}
{{- end -}}
{{- if and $v.tls.requireClientAuth (not $v.tls.secretName) -}}
{{- fail "tls.requireClientAuth: needs tls.secretName (a Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if and (include "shardserve.mutualTls" .) (eq $v.service.podSelector "serve") -}}
{{- fail "service.podSelector: serve is not possible with mutual TLS (the Ingress replicas on the head pod serve HTTP, no Serve proxy runs); use head" -}}
{{- end -}}
{{- if and $v.apiKeys.keys (not $v.apiKeys.existingSecret) -}}
{{- fail "apiKeys.existingSecret: name the Secret that holds apiKeys.keys[].secretKey" -}}
{{- end -}}
{{- $keyNames := dict -}}
{{- range $k := concat ($v.apiKeys.keys | default list) (($v.shardserve.auth | default dict).api_keys | default list) -}}
{{- if hasKey $keyNames $k.name -}}
{{- fail (printf "apiKeys.keys: key name %q appears twice (with shardserve.auth.api_keys); names must be unique" $k.name) -}}
{{- end -}}
{{- $_ := set $keyNames $k.name true -}}
{{- end -}}

{{- $ports := dict -}}
{{- range $field, $port := dict "shardserve.http.port" $v.shardserve.http.port "shardserve.grpc.port" $v.shardserve.grpc.port "metrics.port" $v.metrics.port "Ray GCS" 6379 "Ray dashboard" 8265 "Ray client" 10001 "Ray dashboard agent" 52365 -}}
{{- $key := toString (int $port) -}}
{{- if hasKey $ports $key -}}
{{- fail (printf "%s: port %s is already taken by %s; every pod listens on both" $field $key (index $ports $key)) -}}
{{- end -}}
{{- $_ := set $ports $key $field -}}
{{- end -}}

{{- /* Pod shapes Ray can place workers on: worker groups, plus the head when it offers CPUs. */ -}}
{{- $pods := list -}}
{{- $totalGpus := 0 -}}
{{- $names := dict -}}
{{- range $gi, $g := $v.workerGroups -}}
{{- $gw := printf "workerGroups[%d] (%s)" $gi $g.name -}}
{{- if hasKey $names $g.name -}}
{{- fail (printf "%s.name: %q is used by two worker groups; names must be unique" $gw $g.name) -}}
{{- end -}}
{{- $_ := set $names $g.name true -}}
{{- $r := int $g.replicas -}}{{- $min := int $g.minReplicas -}}{{- $max := int $g.maxReplicas -}}
{{- if or (lt $r $min) (gt $r $max) -}}
{{- fail (printf "%s: replicas %d must lie in [minReplicas %d, maxReplicas %d]" $gw $r $min $max) -}}
{{- end -}}
{{- $count := ternary $max $r (and $v.rayAutoscaler.enabled true) -}}
{{- $pods = append $pods (dict "name" (printf "worker group %s" $g.name) "gpus" (int $g.gpusPerPod) "cpus" (int $g.cpusPerPod) "count" $count) -}}
{{- $totalGpus = add $totalGpus (mul (int $g.gpusPerPod) $count) -}}
{{- end -}}
{{- if gt (int $v.head.numCpus) 0 -}}
{{- $pods = append $pods (dict "name" "head" "gpus" 0 "cpus" (int $v.head.numCpus) "count" 1) -}}
{{- end -}}

{{- $minNeed := 0.0 -}}{{- $maxNeed := 0.0 -}}
{{- $modelNames := dict -}}
{{- range $i, $m := $models -}}
{{- $at := printf "shardserve.models[%d]" $i -}}
{{- if not $m.name -}}
{{- fail (printf "%s.name: required (the model name clients send)" $at) -}}
{{- end -}}
{{- $at = printf "shardserve.models[%d] (%s)" $i $m.name -}}
{{- if hasKey $modelNames $m.name -}}
{{- fail (printf "%s.name: %q is listed twice; model names must be unique" $at $m.name) -}}
{{- end -}}
{{- $_ := set $modelNames $m.name true -}}
{{- if not $m.source -}}
{{- fail (printf "%s.source: required: default | /path/to/hf-folder | /path/file.gguf | dummy:<shape>" $at) -}}
{{- end -}}
{{- if and (hasKey $m "replicas") (not (kindIs "invalid" $m.replicas)) $m.autoscaling -}}
{{- fail (printf "%s: set either replicas (%v) or autoscaling, not both" $at $m.replicas) -}}
{{- end -}}

{{- $par := $m.parallel | default dict -}}
{{- $tp := int ($par.tensor_parallel_size | default 1) -}}
{{- $pp := int ($par.pipeline_parallel_size | default 1) -}}
{{- $ep := int ($par.expert_parallel_size | default 1) -}}
{{- $res := $m.resources | default dict -}}
{{- $gpw := float64 ($res.num_gpus_per_worker | default 0) -}}
{{- $cpw := float64 (ternary $res.num_cpus_per_worker 1 (hasKey $res "num_cpus_per_worker")) -}}

{{- /* Model-shape hints (optional; not part of the serve config). */ -}}
{{- $h := index ($v.modelHints | default dict) $m.name | default dict -}}
{{- with $h.numAttentionHeads -}}
{{- if ne (mod (int .) $tp) 0 -}}
{{- fail (printf "%s.parallel.tensor_parallel_size: %d does not divide modelHints.%s.numAttentionHeads (%d); use a divisor of %d" $at $tp $m.name (int .) (int .)) -}}
{{- end -}}
{{- end -}}
{{- with $h.numKeyValueHeads -}}
{{- if and (ne (mod (int .) $tp) 0) (ne (mod $tp (int .)) 0) -}}
{{- fail (printf "%s.parallel.tensor_parallel_size: %d and modelHints.%s.numKeyValueHeads (%d) must divide one another" $at $tp $m.name (int .)) -}}
{{- end -}}
{{- end -}}
{{- with $h.numExperts -}}
{{- if ne (mod (int .) $ep) 0 -}}
{{- fail (printf "%s.parallel.expert_parallel_size: %d does not divide modelHints.%s.numExperts (%d)" $at $ep $m.name (int .)) -}}
{{- end -}}
{{- end -}}
{{- if ne (mod $tp $ep) 0 -}}
{{- fail (printf "%s.parallel.expert_parallel_size: %d must divide tensor_parallel_size %d (experts are sharded inside a stage's TP group, as the engine requires)" $at $ep $tp) -}}
{{- end -}}
{{- if and (eq ($m.device | default "auto") "cuda") (eq $gpw 0.0) -}}
{{- fail (printf "%s.device: cuda needs resources.num_gpus_per_worker > 0" $at) -}}
{{- end -}}

{{- /* Does one replica fit some pod shape? */ -}}
{{- $stageGpus := mulf $gpw $tp -}}
{{- $stageCpus := mulf $cpw $tp -}}
{{- $replicaGpus := mulf $stageGpus $pp -}}
{{- $fits := false -}}
{{- $shapes := list -}}
{{- range $pods -}}
{{- $byGpu := $big -}}{{- $byCpu := $big -}}
{{- if gt $stageGpus 0.0 }}{{ $byGpu = int (floor (divf .gpus $stageGpus)) }}{{ end -}}
{{- if gt $stageCpus 0.0 }}{{ $byCpu = int (floor (divf .cpus $stageCpus)) }}{{ end -}}
{{- $stagesPerPod := int (min $byGpu $byCpu) -}}
{{- if and (gt $stagesPerPod 0) (le (int (ceil (divf $pp $stagesPerPod))) (int .count)) -}}
{{- $fits = true -}}
{{- end -}}
{{- $shapes = append $shapes (printf "%s: %d x (%d GPUs, %d CPUs)" .name (int .count) (int .gpus) (int .cpus)) -}}
{{- end -}}
{{- if not $fits -}}
{{- fail (printf "%s: a replica needs %v GPUs (resources.num_gpus_per_worker %v x parallel.tensor_parallel_size %d x parallel.pipeline_parallel_size %d); each pipeline stage (%v GPUs, %v CPUs) must fit on one pod and its %d stages on the pods of one worker group, but the pods are [%s]" $at $replicaGpus $gpw $tp $pp $stageGpus $stageCpus $pp (join "; " $shapes)) -}}
{{- end -}}

{{- $lo := 1 -}}{{- $hi := 1 -}}
{{- if $m.autoscaling -}}
{{- $lo = int (ternary $m.autoscaling.min_replicas 1 (hasKey $m.autoscaling "min_replicas")) -}}
{{- $hi = int (ternary $m.autoscaling.max_replicas 1 (hasKey $m.autoscaling "max_replicas")) -}}
{{- if lt $hi $lo -}}
{{- fail (printf "%s.autoscaling.max_replicas: %d must be >= min_replicas %d" $at $hi $lo) -}}
{{- end -}}
{{- else if not (kindIs "invalid" $m.replicas) -}}
{{- $lo = int $m.replicas -}}{{- $hi = $lo -}}
{{- end -}}
{{- $minNeed = addf $minNeed (mulf $replicaGpus $lo) -}}
{{- $maxNeed = addf $maxNeed (mulf $replicaGpus $hi) -}}

{{- /* Model files on a mounted volume must be under its mountPath. */ -}}
{{- $s := $v.modelStorage -}}
{{- if and (has $s.type (list "pvc" "hostPath")) (hasPrefix "/" $m.source) (not (hasPrefix (printf "%s/" (trimSuffix "/" $s.mountPath)) $m.source)) -}}
{{- fail (printf "%s.source: %q is not under modelStorage.mountPath %q where the %s volume is mounted" $at $m.source $s.mountPath $s.type) -}}
{{- end -}}
{{- end -}}

{{- if gt $minNeed (float64 $totalGpus) -}}
{{- fail (printf "shardserve.models: the replicas need %v GPUs in all (replicas / autoscaling.min_replicas x GPUs per replica) but workerGroups offer %d (gpusPerPod x %s)" $minNeed $totalGpus (ternary "maxReplicas" "replicas" (and $v.rayAutoscaler.enabled true))) -}}
{{- end -}}
{{- if gt $maxNeed (float64 $totalGpus) -}}
{{- fail (printf "shardserve.models: at autoscaling.max_replicas the replicas need %v GPUs in all but workerGroups offer %d (gpusPerPod x %s); raise maxReplicas (with rayAutoscaler.enabled) or lower max_replicas" $maxNeed $totalGpus (ternary "maxReplicas" "replicas" (and $v.rayAutoscaler.enabled true))) -}}
{{- end -}}
{{- end -}}
