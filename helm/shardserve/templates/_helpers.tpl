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
{{- end -}}

{{/* The Ray pods' Serve app document: the `shardserve:` values verbatim (minus `ray:`, which the
     Ray cluster itself provides), validated at start by shardserve.cluster.config.ServeConfig. */}}
{{- define "shardserve.serveConfig" -}}
{{- $sv := .Values.serve -}}
{{- $grpc := dict "port" .Values.shardserve.grpc.port "grpc_servicer_functions" $sv.grpcServicerFunctions -}}
{{- $http := dict "host" .Values.shardserve.http.host "port" .Values.shardserve.http.port -}}
{{- $app := dict "name" $sv.appName "route_prefix" $sv.routePrefix "import_path" $sv.importPath "args" (omit .Values.shardserve "ray") -}}
{{- with $sv.runtimeEnv }}{{ $_ := set $app "runtime_env" . }}{{ end -}}
{{- $doc := dict "proxy_location" $sv.proxyLocation "http_options" $http "grpc_options" $grpc "applications" (list $app) -}}
{{- toYaml $doc -}}
{{- end -}}
