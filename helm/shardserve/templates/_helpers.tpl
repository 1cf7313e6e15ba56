{{/*
Names, labels and small shared fragments. Validation of values lives in _validate.tpl.
*/}}

{{- define "shardserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name; kept to 40 characters because KubeRay appends suffixes
     (-<hash>, -head-svc, -serve-svc, -<group>-worker-xxxxx) to build pod and Service names. */}}
{{- define "shardserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shardserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select this release's pods (stable across upgrades). */}}
{{- define "shardserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "shardserve.labels" -}}
helm.sh/chart: {{ include "shardserve.chart" . }}
{{ include "shardserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shardserve
{{- end -}}

{{- define "shardserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "shardserve.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret -}}
{{- .Values.apiKey.existingSecret -}}
{{- else -}}
{{- printf "%s-api-key" (include "shardserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "shardserve.modelsClaimName" -}}
{{- if .Values.modelStorage.pvc.existingClaim -}}
{{- .Values.modelStorage.pvc.existingClaim -}}
{{- else -}}
{{- printf "%s-models" (include "shardserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Container ports every Ray pod declares. "serve" is the name KubeRay's serve Service looks for. */}}
{{- define "shardserve.servePorts" -}}
- name: serve
  containerPort: {{ .Values.shardserve.http.port }}
  protocol: TCP
- name: grpc
  containerPort: {{ .Values.shardserve.grpc.port }}
  protocol: TCP
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end -}}

{{/* Environment shared by head and workers: API key, NCCL settings, user extras. */}}
{{- define "shardserve.commonEnv" -}}
{{- if .Values.apiKey.enabled }}
- name: SHARDSERVE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "shardserve.apiKeySecretName" . }}
      key: {{ .Values.apiKey.existingSecretKey }}
{{- end }}
{{- range $k, $val := .Values.nccl.env }}
- name: {{ $k }}
  value: {{ $val | toString | quote }}
{{- end }}
{{- range $k, $val := .Values.rayServe.env }}
- name: {{ $k }}
  value: {{ $val | toString | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes shared by head and workers: /dev/shm (NCCL, Ray object store) and model storage.
     Call with (dict "root" $ "shmSize" "16Gi"). */}}
{{- define "shardserve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- $s := .root.Values.modelStorage }}
{{- if eq $s.type "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "shardserve.modelsClaimName" .root }}
    readOnly: {{ $s.readOnly }}
{{- else if eq $s.type "hostPath" }}
- name: models
  hostPath:
    path: {{ $s.hostPath.path }}
    type: {{ $s.hostPath.type }}
{{- end }}
{{- with .root.Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- if .root.Values.apiKeys.keys }}
- name: api-keys
  secret:
    secretName: {{ .root.Values.apiKeys.existingSecret }}
{{- end }}
{{- end -}}

{{- define "shardserve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- $s := .Values.modelStorage }}
{{- if has $s.type (list "pvc" "hostPath") }}
- name: models
  mountPath: {{ $s.mountPath }}
  readOnly: {{ $s.readOnly }}
{{- end }}
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.apiKeys.keys }}
- name: api-keys
  mountPath: {{ .Values.apiKeys.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The Ray pods' Serve app document: the `shardserve:` values verbatim (minus `ray:`, which the
     Ray cluster itself provides), validated at start by shardserve.cluster.config.ServeConfig. */}}
{{/* The app's args are the `shardserve:` values plus what the chart's tls and apiKeys sections
     mount: tls → shardserve.tls (files under tls.mountPath), apiKeys.keys → auth.api_keys entries
     reading key_file under apiKeys.mountPath. HTTPS is a Serve proxy option (http_options.ssl_*);
     gRPC needs no proxy option: the Ingress serves it (no grpc_options, so Serve starts no gRPC proxy). */}}
{{- define "shardserve.appArgs" -}}
{{- $args := omit (deepCopy .Values.shardserve) "ray" -}}
{{- $t := .Values.tls -}}
{{- if $t.secretName -}}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $t.mountPath) "key_file" (printf "%s/tls.key" $t.mountPath) -}}
{{- if $t.requireClientAuth -}}
{{- $_ := set $tls "ca_file" (printf "%s/ca.crt" $t.mountPath) -}}
{{- $_ := set $tls "require_client_auth" true -}}
{{- end -}}
{{- $_ := set $args "tls" $tls -}}
{{- end -}}
{{- if .Values.apiKeys.keys -}}
{{- $auth := deepCopy ($args.auth | default dict) -}}
{{- $keys := $auth.api_keys | default list -}}
{{- range $k := .Values.apiKeys.keys -}}
{{- $entry := dict "name" $k.name "key_file" (printf "%s/%s" $.Values.apiKeys.mountPath $k.secretKey) -}}
{{- if $k.requestsPerMinute }}{{ $_ := set $entry "requests_per_minute" $k.requestsPerMinute }}{{ end -}}
{{- if $k.tokensPerMinute }}{{ $_ := set $entry "tokens_per_minute" $k.tokensPerMinute }}{{ end -}}
{{- $keys = append $keys $entry -}}
{{- end -}}
{{- $_ := set $auth "api_keys" $keys -}}
{{- $_ := set $args "auth" $auth -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* "true" when TLS is on (the chart's Secret or shardserve.tls), else empty. */}}
{{- define "shardserve.tlsOn" -}}
{{- if or .Values.tls.secretName .Values.shardserve.tls }}true{{ end -}}
{{- end -}}

{{/* "true" with mutual TLS: the Ingress replicas (head pod) serve HTTPS themselves and Serve starts no
     HTTP proxy, as `shardserve serve` does (cluster/app.py serve_options), else empty. */}}
{{- define "shardserve.mutualTls" -}}
{{- if (include "shardserve.appArgs" . | fromYaml).tls }}{{ if (include "shardserve.appArgs" . | fromYaml).tls.require_client_auth }}true{{ end }}{{ end -}}
{{- end -}}

{{- define "shardserve.serveConfig" -}}
{{- $sv := .Values.serve -}}
{{- $args := include "shardserve.appArgs" . | fromYaml -}}
{{- $http := dict "host" .Values.shardserve.http.host "port" .Values.shardserve.http.port -}}
{{- $proxyLocation := $sv.proxyLocation -}}
{{- if include "shardserve.mutualTls" . -}}
{{- $proxyLocation = "Disabled" -}}
{{- else -}}
{{- with $args.tls -}}
{{- $_ := set $http "ssl_certfile" .cert_file -}}
{{- $_ := set $http "ssl_keyfile" .key_file -}}
{{- with .ca_file }}{{ $_ := set $http "ssl_ca_certs" . }}{{ end -}}
{{- end -}}
{{- end -}}
{{- $app := dict "name" $sv.appName "route_prefix" $sv.routePrefix "import_path" $sv.importPath "args" $args -}}
{{- with $sv.runtimeEnv }}{{ $_ := set $app "runtime_env" . }}{{ end -}}
{{- $doc := dict "proxy_location" $proxyLocation "http_options" $http "applications" (list $app) -}}
{{- toYaml $doc -}}
{{- end -}}

{{/* Readiness probes with TLS. KubeRay's own (and its ray.io/serve label, which the Services select
     without TLS) GET http://<pod>:<serve port>/-/healthz in plaintext, which an HTTPS port never
     answers; so with TLS the chart sets the probes and the Services select ready pods.
     Head: GET /health (200 when every model answers) on the HTTP port: an httpGet probe over HTTPS,
     or with mutual TLS (no httpGet probe can present a client certificate) `shardserve probe`
     presenting the TLS certificate (it needs the client-auth usage, or no extended key usage).
     Workers: their Serve proxy's /-/healthz over HTTPS when they run one (TLS without client auth,
     proxyLocation EveryNode), else the raylet's health on the dashboard agent (KubeRay's check). */}}
{{- define "shardserve.headReadinessProbe" -}}
{{- $args := include "shardserve.appArgs" . | fromYaml -}}
{{- if include "shardserve.mutualTls" . -}}
{{- $host := .Values.shardserve.http.host -}}
{{- $host = ternary "127.0.0.1" $host (has $host (list "0.0.0.0" "::" "")) -}}
exec:
  command: ["shardserve", "probe", {{ printf "https://%s:%d/health" $host (int .Values.shardserve.http.port) | quote }}, "--cert", {{ $args.tls.cert_file | quote }}, "--key", {{ $args.tls.key_file | quote }}]
{{- else }}
httpGet:
  path: /health
  port: serve
  scheme: HTTPS
{{- end }}
{{ include "shardserve.probeTiming" . }}
{{- end -}}

{{- define "shardserve.workerReadinessProbe" -}}
{{- if and (not (include "shardserve.mutualTls" .)) (eq .Values.serve.proxyLocation "EveryNode") -}}
httpGet:
  path: /-/healthz
  port: serve
  scheme: HTTPS
{{- else -}}
httpGet:
  path: /api/local_raylet_healthz
  port: 52365
  scheme: HTTP
{{- end }}
{{ include "shardserve.probeTiming" . }}
{{- end -}}

{{- define "shardserve.probeTiming" -}}
initialDelaySeconds: 10
periodSeconds: 10
timeoutSeconds: 10
failureThreshold: 3
{{- end -}}
