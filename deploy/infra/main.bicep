// The Azure resources of docs/deploy.md, "AKS with a GPU node pool", as one resource group
// deployment: the cluster with its system and GPU pools, the registry it pulls from, Azure
// Managed Redis, Azure Monitor managed Prometheus and Azure Managed Grafana.
//
//   az deployment group create -g "$RESOURCE_GROUP" -n batchserve-infra \
//     -f deploy/infra/main.bicep -p namePrefix=batchserve gpuVmSize=Standard_NC4as_T4_v3
//
// deploy/infra/README.md lists the parameters, the outputs and the guide's steps that remain.
//
// tests/test_deploy_infra.py keeps the sizes, counts, taint, network flags and Redis port equal
// to the guide, the kustomize overlays and deploy/azure/pricing.json.
targetScope = 'resourceGroup'

@description('Region of every resource (the GPU size must be offered there, with quota).')
param location string = resourceGroup().location

@description('Start of every resource name: lower-case letters, digits and hyphens.')
@minLength(3)
@maxLength(12)
param namePrefix string = 'batchserve'

@description('Kubernetes version of the control plane and both pools (az aks get-versions -l LOCATION). At least 1.30: the manifests use the preStop sleep action.')
param kubernetesVersion string = '1.34'

@description('System pool VM size: the cluster add-ons, KEDA, the ingress controller and the Prometheus agents run here.')
param systemVmSize string = 'Standard_D4s_v5'

@description('System pool nodes, one per zone.')
@minValue(3)
param systemNodeCount int = 3

@description('GPU pool VM size, one GPU per node: NVIDIA T4, A100 or H100 NVL.')
@allowed([
  'Standard_NC4as_T4_v3'
  'Standard_NC24ads_A100_v4'
  'Standard_NC40ads_H100_v5'
])
param gpuVmSize string = 'Standard_NC4as_T4_v3'

@description('Fewest GPU nodes the cluster autoscaler keeps.')
@minValue(0)
param gpuMinCount int = 1

@description('Most GPU nodes the cluster autoscaler adds (GPU quota permitting).')
@minValue(1)
param gpuMaxCount int = 4

@description('Availability zones of both pools.')
param zones array = [
  '1'
  '2'
  '3'
]

@description('Two pods per GPU (overlays/aks-gpu-shared): no AKS-managed driver, so that the NVIDIA GPU Operator installs it, and the device-plugin configuration label of cluster/gpu-sharing.')
param gpuTimeSlicing bool = false

@description('Container registry name: globally unique, 5-50 letters and digits.')
@minLength(5)
@maxLength(50)
param acrName string = take('${replace(namePrefix, '-', '')}${uniqueString(resourceGroup().id)}', 50)

@description('Azure Managed Redis name, unique in the region (its host is NAME.REGION.redis.azure.net).')
@minLength(1)
@maxLength(60)
param redisName string = '${namePrefix}-${uniqueString(resourceGroup().id)}'

@description('Azure Managed Redis size, the one the cost model prices (Balanced_B0: 0.5 GB, twice the dev Redis).')
param redisSku string = 'Balanced_B0'

@description('Azure Monitor managed Prometheus and Azure Managed Grafana: the cluster metrics kept in Azure and the dashboards on them. KEDA still reads the in-cluster Prometheus of the guide.')
param managedPrometheus bool = true

@description('Object ID of a user or group made Grafana Admin on the Grafana instance; empty for none.')
param grafanaAdminObjectId string = ''

// Built-in role definition IDs, the same in every tenant.
var acrPullRole = '7f951dda-4ed3-4680-a7ca-43fe172d538d'
var monitoringDataReaderRole = 'b0d8363b-8ddd-447d-831f-62ca05bff136'
var grafanaAdminRole = '22926164-76b3-42b3-bc55-97df8dab3e41'

resource aks 'Microsoft.ContainerService/managedClusters@2026-08-01' = {
  name: namePrefix
  location: location
  // Standard tier: the API server's uptime SLA (deploy/azure/pricing.json prices it).
  sku: {
    name: 'Base'
    tier: 'Standard'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    kubernetesVersion: kubernetesVersion
    dnsPrefix: namePrefix
    agentPoolProfiles: [
      {
        name: 'system'
        mode: 'System'
        type: 'VirtualMachineScaleSets'
        osType: 'Linux'
        vmSize: systemVmSize
        count: systemNodeCount
        availabilityZones: zones
        orchestratorVersion: kubernetesVersion
      }
    ]
    // Azure CNI overlay with the Cilium dataplane, which also enforces NetworkPolicy: without a
    // policy engine the manifests' egress lockdown would do nothing.
    networkProfile: {
      networkPlugin: 'azure'
      networkPluginMode: 'overlay'
      networkDataplane: 'cilium'
      networkPolicy: 'cilium'
      loadBalancerSku: 'standard'
    }
    // KEDA (the overlays' autoscaler) and the application routing add-on (managed NGINX).
    workloadAutoScalerProfile: {
      keda: {
        enabled: true
      }
    }
    ingressProfile: {
      webAppRouting: {
        enabled: true
      }
    }
    // Workload identity, for pods that read Key Vault or reach Azure with Entra ID.
    oidcIssuerProfile: {
      enabled: true
    }
    securityProfile: {
      workloadIdentity: {
        enabled: true
      }
    }
    // The managed Prometheus agents; the data collection rule below sends their samples to the
    // Azure Monitor workspace.
    azureMonitorProfile: {
      metrics: {
        enabled: managedPrometheus
      }
    }
  }
}

// Tainted so that only pods tolerating sku=gpu:NoSchedule land here; AKS labels every node of
// an N-series pool kubernetes.azure.com/accelerator=nvidia, which the GPU overlays require.
resource gpuPool 'Microsoft.ContainerService/managedClusters/agentPools@2026-08-01' = {
  parent: aks
  name: 'gpu'
  properties: {
    mode: 'User'
    type: 'VirtualMachineScaleSets'
    osType: 'Linux'
    vmSize: gpuVmSize
    count: gpuMinCount
    enableAutoScaling: true
    minCount: gpuMinCount
    maxCount: gpuMaxCount
    availabilityZones: zones
    orchestratorVersion: kubernetesVersion
    nodeTaints: [
      'sku=gpu:NoSchedule'
    ]
    nodeLabels: gpuTimeSlicing ? { 'nvidia.com/device-plugin.config': 'time-sliced-2' } : {}
    gpuProfile: {
      driver: gpuTimeSlicing ? 'None' : 'Install'
    }
  }
}

resource acr 'Microsoft.ContainerRegistry/registries@2025-11-01' = {
  name: acrName
  location: location
  sku: {
    name: 'Standard'
  }
  properties: {
    adminUserEnabled: false
  }
}

// What `az aks create --attach-acr` does: the kubelet's identity may pull from the registry.
resource kubeletPullsFromAcr 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(acr.id, aks.id, acrPullRole)
  scope: acr
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPullRole)
    principalId: aks.properties.identityProfile.kubeletidentity.objectId
    principalType: 'ServicePrincipal'
  }
}

// Azure Managed Redis, the aks-gpu overlay's shared cache tier (components/azure-redis).
resource redis 'Microsoft.Cache/redisEnterprise@2025-07-01' = {
  name: redisName
  location: location
  sku: {
    name: redisSku
  }
  // Reachable from the internet behind TLS and the access key, as in the guide; in production
  // give it a private endpoint in the cluster's virtual network and set this to 'Disabled'.
  properties: {
    minimumTlsVersion: '1.2'
    highAvailability: 'Enabled'
    publicNetworkAccess: 'Enabled'
  }
}

// TLS only on 10000, the port the NetworkPolicy lets the pods reach. EnterpriseCluster shows
// one endpoint, so the server's plain (non-cluster) Redis client works; the cache evicts the
// least recently used keys when full, like the dev Redis.
resource redisDatabase 'Microsoft.Cache/redisEnterprise/databases@2025-07-01' = {
  parent: redis
  name: 'default'
  properties: {
    clientProtocol: 'Encrypted'
    port: 10000
    clusteringPolicy: 'EnterpriseCluster'
    evictionPolicy: 'AllKeysLRU'
    accessKeysAuthentication: 'Enabled'
  }
}

// Azure Monitor workspace: the managed Prometheus store.
resource monitorWorkspace 'Microsoft.Monitor/accounts@2023-04-03' = if (managedPrometheus) {
  name: '${namePrefix}-prometheus'
  location: location
}

// The endpoint, rule and associations that `az aks update --enable-azure-monitor-metrics`
// creates: the cluster's Prometheus agents forward every sample to the workspace.
resource collectionEndpoint 'Microsoft.Insights/dataCollectionEndpoints@2023-03-11' = if (managedPrometheus) {
  name: '${namePrefix}-prometheus-dce'
  location: location
  kind: 'Linux'
  properties: {}
}

resource collectionRule 'Microsoft.Insights/dataCollectionRules@2023-03-11' = if (managedPrometheus) {
  name: '${namePrefix}-prometheus-dcr'
  location: location
  kind: 'Linux'
  properties: {
    dataCollectionEndpointId: collectionEndpoint.id
    dataSources: {
      prometheusForwarder: [
        {
          name: 'PrometheusDataSource'
          streams: [
            'Microsoft-PrometheusMetrics'
          ]
          labelIncludeFilter: {}
        }
      ]
    }
    destinations: {
      monitoringAccounts: [
        {
          name: 'MonitoringAccount1'
          accountResourceId: monitorWorkspace.id
        }
      ]
    }
    dataFlows: [
      {
        streams: [
          'Microsoft-PrometheusMetrics'
        ]
        destinations: [
          'MonitoringAccount1'
        ]
      }
    ]
  }
}

resource clusterUsesCollectionRule 'Microsoft.Insights/dataCollectionRuleAssociations@2023-03-11' = if (managedPrometheus) {
  name: '${namePrefix}-prometheus-dcra'
  scope: aks
  properties: {
    dataCollectionRuleId: collectionRule.id
    description: 'Sends the cluster managed Prometheus metrics to the Azure Monitor workspace.'
  }
}

// The agents read their configuration through this association; its name is fixed.
resource clusterUsesCollectionEndpoint 'Microsoft.Insights/dataCollectionRuleAssociations@2023-03-11' = if (managedPrometheus) {
  name: 'configurationAccessEndpoint'
  scope: aks
  properties: {
    dataCollectionEndpointId: collectionEndpoint.id
  }
}

resource grafana 'Microsoft.Dashboard/grafana@2025-08-01' = if (managedPrometheus) {
  name: '${namePrefix}-grafana' // 2-23 characters: namePrefix is at most 12
  location: location
  sku: {
    name: 'Standard'
  }
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    zoneRedundancy: 'Enabled'
    grafanaIntegrations: {
      azureMonitorWorkspaceIntegrations: [
        {
          azureMonitorWorkspaceResourceId: monitorWorkspace.id
        }
      ]
    }
  }
}

// Grafana queries the workspace as itself.
resource grafanaReadsMetrics 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (managedPrometheus) {
  name: guid(monitorWorkspace.id, grafana.id, monitoringDataReaderRole)
  scope: monitorWorkspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringDataReaderRole)
    principalId: grafana.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource grafanaAdmin 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (managedPrometheus && !empty(grafanaAdminObjectId)) {
  name: guid(grafana.id, grafanaAdminObjectId, grafanaAdminRole)
  scope: grafana
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', grafanaAdminRole)
    principalId: grafanaAdminObjectId
  }
}

output clusterName string = aks.name
output oidcIssuerUrl string = aks.properties.oidcIssuerProfile.issuerURL
output acrName string = acr.name
output acrLoginServer string = acr.properties.loginServer
// The Secret's URL is rediss://:KEY@HOST:PORT/0, with the key URL-encoded (docs/deploy.md, step 8)
// and read with az redisenterprise database list-keys -g RG --cluster-name NAME.
output redisName string = redis.name
output redisHost string = redis.properties.hostName
output redisPort int = redisDatabase.properties.port
output prometheusQueryEndpoint string = managedPrometheus ? monitorWorkspace.properties.metrics.prometheusQueryEndpoint : ''
output monitorWorkspaceId string = managedPrometheus ? monitorWorkspace.id : ''
output grafanaUrl string = managedPrometheus ? grafana.properties.endpoint : ''
